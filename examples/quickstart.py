"""The model card's simple inference example, runnable on CPU or GPU.

    python examples/quickstart.py --model deepseek-ai/deepseek-vl2-tiny --image ../shared/golden/images/visual_grounding_1.jpeg
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.utils.io import load_pil_images

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="deepseek-ai/deepseek-vl2-tiny", help="hub id or local folder")
parser.add_argument("--image", required=True, help="image path")
parser.add_argument("--prompt", default="<image>\n<|ref|>The giraffe at the back.<|/ref|>.")
parser.add_argument("--max-new-tokens", type=int, default=512)
args = parser.parse_args()

model_path = args.model
vl_chat_processor: DeepseekVLV2Processor = DeepseekVLV2Processor.from_pretrained(model_path)
tokenizer = vl_chat_processor.tokenizer

vl_gpt: DeepseekVLV2ForCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
if torch.cuda.is_available():
    vl_gpt = vl_gpt.to(torch.bfloat16).cuda()
else:
    vl_gpt = vl_gpt.to(torch.float32)
vl_gpt = vl_gpt.eval()

conversation = [
    {"role": "<|User|>", "content": args.prompt, "images": [args.image]},
    {"role": "<|Assistant|>", "content": ""},
]

pil_images = load_pil_images(conversation)
prepare_inputs = vl_chat_processor(
    conversations=conversation, images=pil_images, force_batchify=True, system_prompt=""
).to(vl_gpt.device)

inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)

outputs = vl_gpt.language_model.generate(
    inputs_embeds=inputs_embeds,
    attention_mask=prepare_inputs.attention_mask,
    pad_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    max_new_tokens=args.max_new_tokens,
    do_sample=False,
    use_cache=True,
)

answer = tokenizer.decode(outputs[0].cpu().tolist(), skip_special_tokens=True)
print(f"{prepare_inputs['sft_format'][0]}", answer)

"""Train mode against official numbers beyond the goldens of test_train_golden.py (from a differential fuzz).

The constants were recorded from the official implementation (transformers 4.38.2, float32, CPU, one thread) on the
golden Tiny checkpoint, with the processor's ``mask_prompt`` on (as this package's fine-tuning Collator sets it) and
``process_one(..., inference_mode=False)`` + ``batchify(padding="right")``, then ``model.train()``, forward with
labels, ``loss.backward()``. Tolerances are the goldens': loss atol 1e-4, gradients atol 1e-5, rtol 1e-4.
"""

from __future__ import annotations

import torch

from golden import assert_close, checkpoint

LAYERS = "language.model.layers."

# One labelled answer token plus eos: the LM head projects two rows (see language.blocked_linear).
FEW_LABELS_LOSS = 17.3049946
FEW_LABELS_GRADS = {  # parameter name, row (None: all) -> official gradient
    ("language.model.norm.weight", None): [
        1.99078953, 0.300057501, 0.823649228, 0.103803679, -0.203456149, -0.0496453233, 0.208776861, 0.459504545,
        0.415041298, 0.238800928, 1.98420703, 0.0726400912, 2.01456261, 0.0712905079, 2.93558812, 0.930264235,
    ],
    (LAYERS + "0.post_attention_layernorm.weight", None): [
        1.15293074, 0.542633772, 0.135569453, 1.57050204, -0.0739525259, -1.0125587, 1.00090182, 0.172836587,
        0.889589548, 1.02109897, -0.057654947, 0.959983408, -0.364700466, -1.04181492, -0.572344005, 1.78058732,
    ],
    (LAYERS + "2.input_layernorm.weight", None): [
        -0.00113274902, -0.516052186, 0.000481270254, -0.483420014, 0.0153346509, -0.422026187, -0.696803927,
        0.0812526047, 0.299712688, -0.358195424, -0.215223715, -0.284689993, 1.0967145, -0.143335178, 0.00791706145,
        -0.330169171,
    ],
    (LAYERS + "0.mlp.down_proj.weight", 2): [
        0.043085292, -0.101137467, 0.00728149107, -0.204418913, 0.268274009, -0.342970133, -1.26777697, 0.0639376417,
        0.040123526, -0.248499677, 0.123034686, -0.052893538, 0.0965064764, -0.0649962276, -0.242573142, -0.188683867,
        -0.0543524139, 0.124239057, -0.00946107507, 0.0114509473, 0.393168122, -0.400969088, -0.764273942, 0.171784371,
        0.173923776, 0.0962310582, -0.273689777, 0.196450621, -0.093378678, -0.0379324369, -0.00625753496, 0.150517926,
        -0.174491882, 0.0587860569, -0.0405629352, 0.0129098715, 0.081316635, -0.296946436, 0.0992363393, -0.323896646,
        -0.33415395, 0.922889829, -0.00749397185, -0.155427694, 0.892475307, -0.238729313, -0.0857736096, 0.397533923,
        0.131001726, -0.0809688792, 0.286950231, -0.138206348, -0.0903493837, 0.252963424, -0.542921841, -0.0770193189,
        0.406718969, 0.621906817, -0.0500027798, -0.0107345711, 0.0795078203, -0.0310648121, 0.0759044886,
        -0.0851289928,
    ],
    (LAYERS + "0.self_attn.o_proj.weight", 0): [
        -0.0785105601, -0.641174138, 0.283692807, -0.243100449, 0.684389114, -0.0837314427, -0.0802866817, 0.473590553,
        -0.0132918479, 0.165978372, 0.197415099, -0.278471142, 0.0544097684, -0.0236484986, -0.018251529, 0.103101075,
    ],
    (LAYERS + "1.mlp.shared_experts.down_proj.weight", 10): [
        0.799629629, -0.179847732, -0.177196667, -0.555092275, -0.190428451, 0.0295251999, 0.0706847012, -0.0766338035,
        -0.0505568646, 0.086725302, 0.0766517222, 0.027195897, 0.642337203, 0.513837576, -0.0516073182, -0.0135864504,
        0.882018745, 0.179049179, 0.353392899, 0.0451556817, -0.464054048, 0.0375228524, -0.288044691, -0.181306243,
        0.00913573988, -0.00775081385, -0.00481298519, -0.296287417, -0.0120603144, 0.0516604967, -0.0250549912,
        -0.0368684493,
    ],
}

# Router branches no golden covers, on two rows of equal length (no padding): the batch-level balance loss (seq_aux
# false; per sequence, the router row norms move by up to 2.4e-4, without the balance loss by up to 4.6e-3) at alpha
# 0.05, group-limited top-k, normalised and scaled weights.
ROUTER_CONFIG = {"aux_loss_alpha": 0.05, "seq_aux": False, "topk_method": "group_limited_greedy", "n_group": 4,
                 "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 1.5}  # fmt: skip
ROUTER_CONVERSATIONS = [
    [{"role": "user", "content": "Write one sentence about the sea."},
     {"role": "assistant", "content": "The sea is wide, blue and restless."}],
    [{"role": "user", "content": "Write one sentence about the sky."},
     {"role": "assistant", "content": "The sky is high, grey and quiet."}],
]  # fmt: skip
ROUTER_LOSS = 20.5463829
ROUTER_ROW_NORMS = {  # per expert: norm of the router weight gradient's row
    1: [0.221203879, 0.394448251, 0.433871746, 0.265979171, 0.219603956, 0.396547049, 0.381252289, 0.275541037],
    2: [0.380789936, 0.0854798034, 0.311554819, 0.483627915, 0.259194762, 0.356115639, 0.223676473, 0.164929673],
}
ROUTER_EXPERT_NORMS = [  # layer 1, per routed expert: norm of its down_proj gradient
    0.44330731, 1.14979708, 0.581094146, 0.475024849, 0.578726888, 0.877254844, 0.516567647, 0.257800519,
]


def train_step(conversations: list[list[dict]], **config):
    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    processor = DeepseekVLV2Processor.from_pretrained(checkpoint("tiny"), mask_prompt=True)
    samples = [processor.process_one(conversations=c, images=[], inference_mode=False) for c in conversations]
    batch = processor.batchify(samples, padding="right")
    assert batch.attention_mask.all()  # no padding: the official balance loss would count pads
    model_config = DeepseekVLV2Config.from_pretrained(checkpoint("tiny"))
    for key, value in config.items():
        setattr(model_config.language_config, key, value)
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), config=model_config, dtype=torch.float32)
    model.train()
    loss = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
        images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop, labels=batch.labels,
    ).loss  # fmt: skip
    loss.backward()
    return model, loss


def test_gradients_with_few_labelled_tokens_match_official() -> None:
    """A one-word answer: the LM head's input gradient stays as precise as the official one (was 3x the tolerance)."""
    conversation = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes"}]
    model, loss = train_step([conversation])
    assert abs(loss.item() - FEW_LABELS_LOSS) <= 1e-4
    for (name, row), expected in FEW_LABELS_GRADS.items():
        grad = model.get_parameter(name).grad
        assert_close(grad if row is None else grad[row], torch.tensor(expected), atol=1e-5, rtol=1e-4, name=name)


def test_router_branches_train_as_official() -> None:
    model, loss = train_step(ROUTER_CONVERSATIONS, **ROUTER_CONFIG)
    assert abs(loss.item() - ROUTER_LOSS) <= 1e-4
    layers = model.language.model.layers
    for layer, expected in ROUTER_ROW_NORMS.items():
        norms = layers[layer].mlp.gate.weight.grad.norm(dim=1)
        assert_close(norms, torch.tensor(expected), atol=1e-5, rtol=1e-4, name=f"layer {layer} router")
    norms = torch.stack([expert.down_proj.weight.grad.norm() for expert in layers[1].mlp.experts])
    assert_close(norms, torch.tensor(ROUTER_EXPERT_NORMS), atol=1e-5, rtol=1e-4, name="layer 1 experts")

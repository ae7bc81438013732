"""Fine-tuning DeepSeek-VL2: data (JSONL rows), collate (training batches), lora (what trains), trainer
(transformers.Trainer glue), merge (adapter -> full checkpoint), cli (``deepseek-vl2 finetune`` / ``merge``).

Needs the ``train`` extra (peft); ``import deepseek_vl`` does not import this package.
"""

"""Adapting a pretrained GPT: embeddings, zero-shot and probe classification, task heads, fine-tuning modes.

``embed_texts`` (embed.py) is the entry point for features; heads.py wraps the backbone for a task;
finetune.py trains a head in one of four modes (full, last-k, frozen, LoRA); data.py builds the
labelled tasks from the synthetic world.
"""

from scalelab.adapt.embed import embed_texts

__all__ = ["embed_texts"]

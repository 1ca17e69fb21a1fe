"""Make everything in course_lib/assets/ from scratch, offline, on the CPU.

    python scripts/make_assets.py            # corpus, tokenizer, and ~6 minutes of training

1. corpus.txt: help topics and standard-library docstrings of this Python (course_lib.data)
2. tokenizer.json: byte-pair encoding with a vocabulary of 1024 (course_lib.tokenizer)
3. tiny-gpt/: the trained model, config.json + model.safetensors (course_lib.train)
4. training_record.json: loss curves, final validation loss, samples, timings, versions
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib import checkpoint  # noqa: E402
from course_lib.config import GPTConfig  # noqa: E402
from course_lib.data import CORPUS_PATH, build_corpus, encode_documents, load_corpus, split_documents  # noqa: E402
from course_lib.model import GPT  # noqa: E402
from course_lib.tiny import RECORD_PATH, TINY_DIR, TOKENIZER_PATH  # noqa: E402
from course_lib.tokenizer import train_bpe  # noqa: E402
from course_lib.train import TrainSettings, evaluate, train  # noqa: E402

TINY_CONFIG = dict(vocab_size=1024, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                   resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
SAMPLE_PROMPTS = ["The for statement", "A list is", "def", "Return the"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-corpus", action="store_true", help="keep an existing corpus.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    if not (args.reuse_corpus and CORPUS_PATH.exists()):
        CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
        CORPUS_PATH.write_text(build_corpus())
    corpus = load_corpus()
    tokenizer = train_bpe(corpus, TINY_CONFIG["vocab_size"])
    tokenizer.save(TOKENIZER_PATH)
    train_docs, val_docs = split_documents(corpus)
    train_ids, val_ids = encode_documents(tokenizer, train_docs), encode_documents(tokenizer, val_docs)
    print(f"corpus {len(corpus):,} chars: {len(train_ids):,} train / {len(val_ids):,} val tokens")

    config = GPTConfig(**TINY_CONFIG, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = GPT(config)
    settings = TrainSettings(steps=args.steps, batch_size=32, lr=2e-3, min_lr=1e-4, warmup_steps=100,
                             eval_every=100, seed=0)
    record = train(model, train_ids, val_ids, settings)
    val_loss = evaluate(model, val_ids)

    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
        samples[prompt] = tokenizer.decode(out[0])
    checkpoint.save(model, TINY_DIR)
    result = {
        **record.to_dict(),
        "final_val_loss": val_loss,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "samples": samples,
        "wall_seconds_total": time.perf_counter() - t0,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    RECORD_PATH.write_text(json.dumps(result, indent=1) + "\n")
    print(f"trained {args.steps} steps in {record.seconds:.0f} s; validation loss {val_loss:.4f}")
    for p, s in samples.items():
        print(f"--- {p!r}\n{s}")


if __name__ == "__main__":
    main()

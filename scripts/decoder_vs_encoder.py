"""How much of a checkpoint's answering the block-diffusion decoder loses against its own encoder (CPU or GPU).

    python scripts/decoder_vs_encoder.py MODEL_DIR [--families add,sub,mul,sort,reverse,string_ops] [--per-family 40]

Prints, per task family, the exact match of the same held-out problems answered three ways with the same weights:
the encoder as a causal LM (greedy, token by token), block diffusion with the checkpoint's sampler, and block
diffusion with greedy or near-one-token-a-step settings; then, for one family, the share of answers a single
decoder forward gets entirely right from a canvas whose tokens are replaced by uniform noise with probability t,
against the encoder teacher-forced. A decoder far below the encoder at every t means the model, not the sampler,
holds diffusion back.
"""

from __future__ import annotations

import argparse

import torch

from dgemma.engine.autoregressive import generate_ar
from dgemma.llm import LLM
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache
from dgemma.train import evaluate as ev


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--families", default="add,sub,mul,sort,reverse,string_ops")
    p.add_argument("--per-family", type=int, default=40)
    p.add_argument("--noise-family", default="add")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32", device="cpu")
    families = args.families.split(",")
    examples = ev.heldout(11, args.per_family * len(families), families)
    prompts = [llm.chat_prompt(e.prompt_messages, tools=e.tools, enable_thinking=e.enable_thinking) for e in examples]
    eos = tuple(llm.config.eos_token_id)
    rows = {"encoder, greedy AR": [llm.decode(r.token_ids) for r in generate_ar(llm.model, prompts, 128,
                                                                                  eos_token_ids=eos)]}
    for name, overrides in (("diffusion, checkpoint sampler", {}), ("diffusion, greedy", {"temperature": 0.0}),
                            ("diffusion, entropy bound 0.01", {"entropy_bound": 0.01})):
        rows[name] = [o.text for o in llm.chat([e.prompt_messages for e in examples], seed=0, **overrides)]
    print("decoding".ljust(32) + "".join(f.rjust(12) for f in families))
    for name, texts in rows.items():
        cells = []
        for family in families:
            pairs = [(e, t) for e, t in zip(examples, texts) if e.family == family]
            cells.append(sum((t or "").strip() == e.answer.strip() for e, t in pairs) / len(pairs))
        print(name.ljust(32) + "".join(f"{c:12.0%}" for c in cells))
    one_forward(llm, ev.heldout(11, 60, [args.noise_family]), args.noise_family)


@torch.no_grad()
def one_forward(llm: LLM, examples, family: str) -> None:
    model, cfg = llm.model, llm.model.config
    c = cfg.canvas_length
    gen = torch.Generator().manual_seed(0)
    right: dict[str, int] = {}
    for e in examples:
        prompt = llm.chat_prompt(e.prompt_messages, tools=e.tools, enable_thinking=e.enable_thinking)
        answer = llm.tokenizer.encode(e.answer) + [llm.tokenizer.token_to_id("<turn|>")]
        n = min(len(answer), c)
        target = torch.tensor((answer + [cfg.pad_token_id] * c)[:c])  # [C] the clean canvas
        for t in (1.0, 0.75, 0.5, 0.25):
            cache = KVCache(cfg, 1, len(prompt) + c, model.dtype, model.device)
            model.encode(torch.tensor([prompt]), AttentionBatch.for_encoder([0], [0], [len(prompt)],
                                                                            cfg.sliding_window, cache), cache)
            noise = torch.randint(0, cfg.vocab_size, (c,), generator=gen)
            noisy = torch.where(torch.rand(c, generator=gen) < t, noise, target)  # [C]
            batch = AttentionBatch.for_decoder([0], [len(prompt)], c, cfg.sliding_window, cache)
            argmax = model.decode(noisy[None], batch, cache)[0].argmax(-1)  # [C]
            right[f"decoder, t = {t}"] = right.get(f"decoder, t = {t}", 0) + bool((argmax[:n] == target[:n]).all())
        full = prompt + answer[:n]
        cache = KVCache(cfg, 1, len(full), model.dtype, model.device)
        hidden = model.encode(torch.tensor([full]), AttentionBatch.for_encoder([0], [0], [len(full)],
                                                                               cfg.sliding_window, cache), cache)
        predicted = model.logits(hidden[0, len(prompt) - 1 : len(full) - 1]).argmax(-1)  # [n]
        key = "encoder, teacher-forced"
        right[key] = right.get(key, 0) + bool((predicted == target[:n]).all())
    print(f"\none forward, {len(examples)} held-out {family} problems: answers entirely right")
    for key, count in right.items():
        print(f"  {key.ljust(26)} {count / len(examples):.0%}")


if __name__ == "__main__":
    main()

"""Chat with a trained model:  python -m nanochat.chat CHECKPOINT [-p PROMPT] [options]

CHECKPOINT is a run directory (its newest checkpoint is used) or one of its
`checkpoints/step_NNNNNN` directories; the tokenizer is the run's own (`RUN_DIR/tokenizer`), so
ids mean what they meant in training. Conversations use the tokenizer's chat template
(`<|bos|><|user_start|>…<|user_end|><|assistant_start|>`); a reply ends at `<|assistant_end|>`
(or `<|bos|>`: a base model that was never fine-tuned tends to start a new document instead),
at --max-new-tokens, or where the model's context is full.

    python -m nanochat.chat runs/d20 -p "Why is the sky blue?"     # one reply, then exit
    python -m nanochat.chat runs/d20 --temperature 0 < questions.txt  # one reply per line

Interactive: each line is a user message, answered as it is generated; `clear` starts a new
conversation, `quit` (or Ctrl-D) ends.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nanochat.checkpoint import run_dir_of
from nanochat.common import UserError, cli_main
from nanochat.engine import Engine, Sampling, load_model
from nanochat.runtime import pick_device
from nanochat.tokenizer import Tokenizer


class Chat:
    """A model, its tokenizer, an engine and the conversation so far."""

    def __init__(self, path: str | Path, device: str = "auto", cuda_graph: bool = False,
                 sampling: Sampling = Sampling(0.6, 50), max_new_tokens: int = 256,
                 seed: int | None = None):
        self.device = torch.device(pick_device(device))
        self.model, self.meta, self.step_dir = load_model(path, self.device)  # the run's dtype rule
        self.tokenizer = Tokenizer.load(run_dir_of(self.step_dir) / "tokenizer")
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserError(f"the tokenizer in {run_dir_of(self.step_dir)}/tokenizer has "
                            f"{self.tokenizer.vocab_size} tokens, more than the model's "
                            f"{self.model.config.vocab_size}: they are not from the same run")
        self.engine = Engine(self.model, cuda_graph=cuda_graph)
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.stop = [self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.bos_token_id]
        self.messages: list[dict] = []

    def reply(self, text: str, out=sys.stdout) -> str:
        """Add a user message, stream the assistant's reply to `out`, return it. On a UserError
        (the conversation outgrew the context) the conversation is left as it was."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tokenizer.render_for_completion({"messages": messages})
        ctx = self.model.config.sequence_len
        if len(ids) >= ctx:
            raise UserError(f"the conversation is {len(ids)} tokens, which fills the model's "
                            f"context of {ctx} tokens; shorten the prompt (or type 'clear')")
        tokens, shown = [], ""
        for step in self.engine.generate(
                ids, max_new_tokens=min(self.max_new_tokens, ctx - len(ids)),
                temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                top_p=self.sampling.top_p, stop_tokens=self.stop, generator=self.generator):
            if step[0] is None:
                break
            tokens.append(step[0])
            decoded = self.tokenizer.decode(tokens)
            if not decoded.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                out.write(decoded[len(shown):])
                out.flush()
                shown = decoded
        reply = self.tokenizer.decode(tokens)
        out.write(reply[len(shown):] + "\n")
        out.flush()
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply


def interactive(chat: Chat) -> None:
    print(f"chatting with {chat.step_dir} ('clear' starts over, 'quit' or Ctrl-D ends)", flush=True)
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if line in ("quit", "exit"):
            return
        if line == "clear":
            chat.messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        print("Assistant: ", end="", flush=True)
        try:
            chat.reply(line)
        except UserError as e:  # keep the session: the user can shorten the message or clear
            print(f"\nerror: {e}", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat.chat", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run directory or RUN_DIR/checkpoints/step_NNNNNN")
    ap.add_argument("-p", "--prompt", help="answer this one message and exit")
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    ap.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: in (0, 1]")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: replay the decode step as a graph")
    args = ap.parse_args(argv)
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p).check()
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device auto")
    chat = Chat(args.checkpoint, args.device, args.cuda_graph, sampling, args.max_new_tokens, args.seed)
    if args.prompt is not None:
        chat.reply(args.prompt)
    else:
        interactive(chat)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))

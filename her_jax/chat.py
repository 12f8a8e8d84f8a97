"""python -m her_jax.chat --checkpoint DIR | --hf DIR — role-play with a model in the terminal.

Pick a scene and a character (from the bundled sample scenes, or any HER / CoSER / her_jax file
with --data), then talk: each line you type is said by your persona (--as, default another
character of the scene); the model answers in character with dual-layer thinking. The history
follows HER's rules (METHOD.md §2): the character's earlier turns without system thinking, your
lines as user messages. Commands: /save [FILE] (the conversation as a HER messages record, system
thinking included — loadable as data), /show (toggle the thinking layers), /help, /quit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

_ANSI = {"system_thinking": "38;5;141", "role_thinking": "38;5;39", "role_action": "38;5;214", "speech": "0",
         "name": "1;38;5;83", "tag": "38;5;244", "user": "38;5;250", "note": "2"}
_TAG = re.compile(r"</?(system_thinking|role_thinking|role_action)>")


class ChatError(ValueError):
    """Bad arguments or inputs, reported without a traceback."""


@dataclasses.dataclass
class Session:
    """One conversation with the model: system prompt, history messages and how to sample."""

    model: object
    renderer: object
    tokenizer: object
    character: str
    persona: str
    system: str
    messages: list  # format.Message, after the system message
    params: object  # sampler.SamplingParams
    system_thinking: bool = True  # start each reply with <system_thinking> (HER's dual-layer turns)
    seed: int = 0
    turns: int = 0

    def say(self, line: str):
        """Add the user's line and return the model's reply as a parsed Turn."""
        from her_jax.data.format import CONVERSATION_START, Message

        piece = f"{self.persona}: {line.strip()}"
        if self.messages and self.messages[-1].role == "user":  # unanswered opening or lines: merge
            last = self.messages[-1]
            self.messages[-1] = Message("user", f"{last.content}\n\n{piece}")
        else:
            started = any(m.role in ("user", "assistant") for m in self.messages)
            self.messages.append(Message("user", ("" if started else CONVERSATION_START) + piece))
        return self.reply()

    def reply(self):
        from her_jax.data.format import Message
        from her_jax.rl.sampler import generate

        prompt = self.renderer.prompt([Message("system", self.system), *self.messages])
        prefill = self.tokenizer.encode("<system_thinking>", add_special_tokens=False) if self.system_thinking else []
        out = generate(self.model, [prompt], self.params, seed=self.seed + self.turns, prefill=prefill)
        self.turns += 1
        ids = [t for t in out.sequences()[0] if t not in self.params.stop_tokens]
        text = ("<system_thinking>" if self.system_thinking else "") + self.tokenizer.decode(ids)
        turn = parse_reply(text, self.character)
        self.messages.append(Message("assistant", turn=turn, speaker=self.character))
        return turn

    def record(self) -> dict:
        """The conversation as a HER messages record (assistant turns with their system thinking)."""
        messages = [{"role": "system", "content": self.system}]
        messages += [{"role": m.role, "content": m.content if m.turn is None else m.turn.render(speaker=self.character)}
                     for m in self.messages]
        return {"id": f"chat-{self.character}-{int(time.time())}", "character": self.character,
                "persona": self.persona, "messages": messages,
                "sampling": dataclasses.asdict(self.params)}


def parse_reply(text: str, character: str):
    """The reply as a Turn; text the parser rejects (an unfinished or malformed turn) is kept as
    speech with its tags removed, so the conversation goes on."""
    from her_jax.data.format import FormatError, Segment, Turn, parse_turn

    try:
        return parse_turn(text.strip(), speaker=character)
    except FormatError:
        plain = _TAG.sub(" ", text).strip()
        prefix = f"{character}:"
        plain = plain[len(prefix):].strip() if plain.startswith(prefix) else plain
        return Turn(None, None, (Segment("speech", plain or "…"),))


def show_turn(turn, character: str, *, show_think: bool, show_rolethink: bool, color: bool) -> str:
    spans = turn.spans(speaker=character, system_thinking=show_think, role_thinking=show_rolethink)
    if not color:
        return "".join(text for text, _ in spans)
    return "".join(f"\x1b[{_ANSI.get(layer, '0')}m{text}\x1b[0m" for text, layer in spans)


# -- choosing a scene -------------------------------------------------------------------------------

def load_conversations(paths):
    from her_jax.data.sources import load

    units, report = load(paths)
    conversations = [c for _, convs in units for c in convs]
    if not conversations:
        raise ChatError(f"{', '.join(map(str, paths))}: no usable scene (rejected: {report.to_json()['rejected']})")
    return conversations


def pick(conversations, scene: str | None, character: str | None, ask, out):
    """The conversation for (scene, character): given by id / index, or asked for."""
    scenes = list(dict.fromkeys(c.id.rsplit("/", 1)[0] if "/" in c.id else c.id for c in conversations))
    if scene is None:
        for i, s in enumerate(scenes):
            names = [c.character for c in conversations if c.id.startswith(s)]
            out(f"  [{i}] {s}: {', '.join(names)}")
        scene = ask(f"scene [0-{len(scenes) - 1}]: ") or "0"
    if scene.isdigit():
        if int(scene) >= len(scenes):
            raise ChatError(f"--scene {scene}: there are {len(scenes)} scenes (0-{len(scenes) - 1})")
        scene = scenes[int(scene)]
    options = [c for c in conversations if c.id == scene or c.id.startswith(scene + "/")]
    if not options:
        raise ChatError(f"--scene {scene!r}: no such scene; known: {', '.join(scenes[:10])}"
                        + (" ..." if len(scenes) > 10 else ""))
    if character is None and len(options) > 1:
        character = ask(f"character ({' / '.join(c.character for c in options)}): ") or options[0].character
    chosen = options[0] if character is None else next((c for c in options if c.character == character), None)
    if chosen is None:
        raise ChatError(f"--character {character!r}: scene {scene!r} has {[c.character for c in options]}")
    return chosen


def _persona(conversation, requested: str | None) -> str:
    if requested:
        return requested
    names = re.findall(r"^\*\*(.+?)\*\*:", conversation.messages[0].content, flags=re.M)
    return next((n for n in names if n != conversation.character), "User")


# -- model ------------------------------------------------------------------------------------------

def load_model_and_tokenizer(checkpoint: str | None, hf: str | None, tokenizer: str | None):
    from her_jax.data.tokenizer import load_tokenizer

    if hf:
        from her_jax.convert.hf import load_hf

        model = load_hf(hf)
        tok = load_tokenizer(tokenizer or (hf if os.path.isfile(os.path.join(hf, "tokenizer.json")) else None))
        return model, tok
    from her_jax.train.checkpoint import load_model, resolve, restore_tokenizer

    path = resolve(checkpoint)
    model = load_model(path)
    if tokenizer:
        return model, load_tokenizer(tokenizer)
    folder = tempfile.mkdtemp(prefix="her_jax_tok_")
    return model, load_tokenizer(folder if restore_tokenizer(path, folder) else None)


def main(argv=None, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    p = argparse.ArgumentParser(prog="python -m her_jax.chat", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="her_jax model checkpoint, or a training run folder")
    src.add_argument("--hf", help="Hugging Face Qwen3 folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the Qwen3 tokenizer)")
    p.add_argument("--data", nargs="*", default=["sample"], help="scene files (default: the bundled sample scenes)")
    p.add_argument("--scene", help="scene id or index (default: asked)")
    p.add_argument("--character", help="the character the model plays (default: asked)")
    p.add_argument("--as", dest="persona", help="who you are in the scene (default: another character)")
    p.add_argument("--show-think", action="store_true", help="show the system thinking")
    p.add_argument("--show-rolethink", action="store_true", help="show the character's role thinking")
    p.add_argument("--no-system-thinking", action="store_true", help="do not start replies with <system_thinking>")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-color", action="store_true")
    args = p.parse_args(argv)
    color = not args.no_color and stdout.isatty() and not os.environ.get("NO_COLOR")
    out = lambda text="": print(text, file=stdout, flush=True)  # noqa: E731

    def ask(question: str) -> str | None:
        out(question)
        line = stdin.readline()
        return line.strip() if line else None

    from her_jax.data.sources import SAMPLE_CORPUS
    from her_jax.rl.sampler import SamplingParams

    try:
        paths = [SAMPLE_CORPUS if d == "sample" else d for d in args.data]
        conversation = pick(load_conversations(paths), args.scene, args.character, ask, out)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p)
        model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.hf, args.tokenizer)
    except (ChatError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from her_jax.data.render import Renderer

    first_reply = next((i for i, m in enumerate(conversation.messages) if m.role == "assistant"),
                       len(conversation.messages))
    opening = [m for m in conversation.messages[1:first_reply] if m.role == "user"]
    session = Session(model, Renderer(tokenizer), tokenizer, conversation.character,
                      _persona(conversation, args.persona), conversation.messages[0].content, list(opening), params,
                      system_thinking=not args.no_system_thinking, seed=args.seed)
    show = dict(show_think=args.show_think, show_rolethink=args.show_rolethink)
    out(f"{conversation.id}: you are {session.persona}, the model plays {session.character}. /help for commands.")
    for m in opening:
        out(m.content)
    while True:
        out()
        line = ask(f"{session.persona}> ")
        if line is None or line in ("/quit", "/exit"):
            break
        if not line:
            continue
        if line.startswith("/save"):
            path = line[len("/save"):].strip() or f"chat-{int(time.time())}.json"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(session.record(), f, ensure_ascii=False, indent=1)
            out(f"saved {len(session.messages) + 1} messages to {path}")
            continue
        if line == "/show":
            on = not (show["show_think"] and show["show_rolethink"])
            show = dict(show_think=on, show_rolethink=on)
            out(f"thinking layers {'shown' if on else 'hidden'}")
            continue
        if line.startswith("/"):
            out("/save [FILE]  save the conversation (HER messages record)\n/show  toggle the thinking layers\n"
                "/quit  leave")
            continue
        start = time.perf_counter()
        turn = session.say(line)
        out(show_turn(turn, session.character, color=color, **show))
        if color:
            out(f"\x1b[{_ANSI['note']}m({time.perf_counter() - start:.1f} s)\x1b[0m")
    return 0


if __name__ == "__main__":
    sys.exit(main())

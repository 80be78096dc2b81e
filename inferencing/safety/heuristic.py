"""An offline prompt-injection and jailbreak detector: normalisation plus weighted patterns.

``HeuristicPromptShield`` implements :class:`inferencing.contracts.PromptShield` with no
service, no model and no download, so every deployment has a shield, and the Azure
adapter has something to fall back on.

How it decides:

1. *Normalise* the text the way attackers obfuscate it: NFKC (full-width and
   mathematical letters fold to ASCII), casefold, drop zero-width and other format
   characters, map common Cyrillic/Greek look-alikes to Latin, undo leetspeak inside
   words (``1gn0re``), join spaced-out letters (``i g n o r e``), collapse whitespace.
   Base64 runs are decoded and, when they decode to text, scanned too.
2. *Match* pattern families. Each pattern has a weight per channel (user prompt,
   document) and a fixed reason label.
3. *Score* by noisy-OR over the patterns that matched (``1 - Π(1 - w)``), so two
   medium signals add up and one strong signal is enough. Within a family, only the
   strongest match counts in full and the others at half weight, since they often
   restate one another. Flag at the channel's threshold.

Documents (retrieved passages, tool outputs) are scanned for text addressed to the
assistant ("new instructions:", "if you are an AI", tool-call hijacks, markdown images
that would carry data out in their URL), which is normal in a user's prompt ("respond
only with yes or no") but not in a policy document. Reasons carry the family and a
fixed label, never the matched text, so audit records hold no user content.

Why no classifier: a small offline classifier would help with paraphrased attacks,
but none is reasonable to ship. The established detectors keep their weights on the
Hugging Face hub and fetch them at run time: llm-guard's prompt-injection scanner
(``protectai/deberta-v3-base-prompt-injection-v2``) and Meta's Prompt Guard (through
``transformers``). These machines, like many enterprise networks, reach PyPI but not
the hub. Apart from llm-guard, nemoguardrails and guardrails-ai, no prompt-injection
detector on PyPI ranks among its 15,000 most downloaded packages. The rest are
little-used projects, and not a dependency to trust as a security control. Where a
classifier is wanted, use the Azure AI Content Safety adapter
(``inferencing.safety.azure_content_safety``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from inferencing.contracts import ShieldResult, ShieldVerdict

# Look-alike letters attackers substitute for Latin ones (after casefolding).
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
        "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ӏ": "l", "ɡ": "g", "ո": "n", "ս": "u",
        "α": "a", "ε": "e", "ο": "o", "ρ": "p", "ι": "i", "κ": "k", "ν": "v", "τ": "t",
        "υ": "u", "χ": "x", "ѵ": "v", "ԝ": "w", "ɑ": "a", "ı": "i",
    }
)  # fmt: skip
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
# A word that mixes letters with leet digits or symbols, e.g. "1gn0re" or "pr3v10us".
_LEET_WORD = re.compile(r"\b(?=[a-z0-9@$]*[a-z])(?=[a-z0-9@$]*[013457@$])[a-z0-9@$]{3,}\b")
# Single letters separated by one space, dot, dash or underscore: "i g n o r e", "i.g.n.o.r.e".
_SPACED_LETTERS = re.compile(r"\b(?:[a-z][ ._\-]){2,}[a-z]\b")
_WHITESPACE = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")

PROMPT, DOCUMENT = 0, 1


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    label: str
    weights: tuple[float, float]
    """Weight of a match in a user prompt, and in a document."""
    weaker_than: tuple[str, ...] = ()
    """Labels of stronger patterns that imply this one: when one matches, this is dropped."""
    requires: re.Pattern[str] | None = None
    """A cheap pattern every match contains: when it is absent, the costly one is skipped."""


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    patterns: tuple[_Pattern, ...]


def _p(
    pattern: str,
    label: str,
    prompt: float,
    document: float | None = None,
    *,
    weaker_than: tuple[str, ...] = (),
    requires: str | None = None,
) -> _Pattern:
    weights = (prompt, prompt if document is None else document)
    prefilter = None if requires is None else re.compile(requires)
    return _Pattern(re.compile(pattern), label, weights, weaker_than, prefilter)


# Words used in the patterns, on normalised (casefolded, de-obfuscated) text.
_OVERRIDE = r"(?:ignore|disregard|forget|overrid(?:e|ing)|bypass|skip|abandon|discard|neglect)"
_PRIOR = (
    r"(?:previous|prior|above|earlier|preceding|former|initial|original|foregoing|system"
    r"|developer)"
)
_INSTRUCTIONS = (
    r"(?:instructions?|prompts?|directions|directives?|commands|programming|guardrails"
    r"|system prompt|context)"
)
_RULES = r"(?:rules|guidelines|constraints|restrictions)"
# "all", "any", "the", "your" ... but not "my": a user may take back their own instructions.
_WHOSE = r"(?:(?:all|any|every|the|your|these|those|its|of|everything)\s+){0,3}"
# An order rather than a question: the verb opens a sentence or follows "please", "and",
# "you must" ..., so "should I ignore the previous instructions from HR?" is not one.
_IMPERATIVE = (
    r"(?:^|[.!?:;\n>\]\)\"'“*\-]\s*|\b(?:please|now|just|and|so|then|first|also|simply|kindly"
    r"|you (?:must|should|will|need to|have to|are to))\s+)"
)
_AI = r"(?:ai|llm|language model|chatbot|chatgpt|gpt|copilot|ai (?:model|agent|assistant|system)s?)"
_AI_OR_ASSISTANT = rf"(?:{_AI}|assistant)"

_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "instruction_override",
        (
            _p(
                rf"{_IMPERATIVE}{_OVERRIDE}\s+{_WHOSE}(?:{_PRIOR}\s+){{1,2}}(?:\w+\s+)?"
                rf"{_INSTRUCTIONS}\b",
                "ignore previous instructions",
                0.8,
                0.85,
                requires=_OVERRIDE,
            ),
            _p(
                rf"{_IMPERATIVE}{_OVERRIDE}\s+(?:all|any|every|your)\s+(?:of\s+)?(?:your\s+|the\s+)?"
                rf"(?:{_INSTRUCTIONS}|{_RULES})\b",
                "ignore all instructions",
                0.75,
                0.85,
                requires=_OVERRIDE,
            ),
            _p(
                rf"\b{_OVERRIDE}\s+{_WHOSE}(?:{_PRIOR}\s+){{1,2}}(?:\w+\s+)?{_INSTRUCTIONS}\b",
                "mentions ignoring previous instructions",
                0.3,
                0.5,
                weaker_than=("ignore previous instructions",),
                requires=_OVERRIDE,
            ),
            _p(
                rf"{_IMPERATIVE}{_OVERRIDE}\s+{_WHOSE}(?:{_PRIOR}\s+){{1,2}}{_RULES}\b",
                "ignore previous rules",
                0.45,
                0.6,
                requires=_OVERRIDE,
            ),
            _p(
                rf"{_IMPERATIVE}{_OVERRIDE}\s+(?:all\s+|everything\s+)?(?:the\s+)?"
                r"(?:above|before this|said before|rest of this)\b",
                "ignore the above",
                0.6,
                0.75,
                requires=_OVERRIDE,
            ),
            _p(
                r"\b(?:do not|don't|never|stop)\s+(?:follow|obey|adhere to|listen to)(?:ing)?\s+"
                rf"(?:your|the|any)\s+(?:{_PRIOR}\s+)?(?:{_INSTRUCTIONS}|{_RULES})\b",
                "stop following instructions",
                0.6,
                0.75,
                requires=r"follow|obey|adhere|listen",
            ),
            _p(
                r"\b(?:your|the)\s+new\s+(?:instructions|rules|task|directive|objective|goal)s?\s+"
                r"(?:is|are)\b",
                "your new instructions are",
                0.55,
                0.7,
            ),
            _p(
                r"\binstead of (?:your|the) (?:original|previous|given|actual)"
                r" (?:task|instructions)",
                "instead of the original task",
                0.55,
                0.7,
            ),
            _p(r"\bstop everything\b", "stop everything", 0.5, 0.6),
            _p(r"\bnever ?mind\W+ignore\b", "nevermind, ignore", 0.6, 0.75),
            _p(
                r"\bfrom now on,? you (?:will|are|must|shall|should) (?:act|respond|answer|be|only"
                r"|ignore|pretend|obey|no longer)\b",
                "from now on you will",
                0.35,
                0.55,
            ),
        ),
    ),
    _Family(
        "roleplay_jailbreak",
        (
            _p(r"\bdo anything now\b", "do anything now", 0.9),
            _p(
                r"\b(?:dan|stan|dude|aim|anti-dan|betterdan)\s+mode\b", "named jailbreak mode", 0.85
            ),
            _p(
                r"\b(?:you are|you're|act as|pretend to be|become|roleplay as|play the role of)\s+"
                r"(?:a\s+|an\s+)?(?:dan|stan|dude|aim|evil\s+\w+|unfiltered\s+\w+|uncensored\s+\w+)\b",
                "named jailbreak persona",
                0.7,
                requires=r"dan|stan|dude|aim|evil|unfiltered|uncensored",
            ),
            _p(
                r"\bdeveloper mode (?:enabled|output|response|activated)\b|\b(?:chatgpt|ai|you)"
                r" (?:with|in) developer mode\b",
                "developer mode persona",
                0.8,
            ),
            _p(r"\bjailbr(?:oken|eak)\b", "jailbreak named", 0.45, 0.45),
            _p(
                rf"\b(?:you|{_AI_OR_ASSISTANT}|character|persona|it)\s+(?:has|have|with|without)\s+"
                r"no\s+(?:restrictions|filters?|limit(?:s|ations)|rules|ethics|morals|guidelines"
                r"|boundaries|censorship|constraints)\b",
                "assistant without restrictions",
                0.6,
                requires=r"no\s",
            ),
            _p(
                r"\b(?:without|free (?:of|from)|no longer (?:bound|restricted) by|not bound by)\s+"
                r"(?:any\s+)?(?:ethical|moral|content|safety|openai|usage)?\s*"
                r"(?:restrictions|filters|censorship|guidelines|limitations|polic(?:y|ies)|rules"
                r"|constraints|principles)\b",
                "free of restrictions",
                0.4,
            ),
            _p(
                r"\b(?:bypass|circumvent|evade|get around|ignore|break)\s+"
                r"(?:the\s+|your\s+|any\s+)?"
                r"(?:openai(?:'s)?\s+|content\s+|safety\s+|usage\s+|ethical\s+)"
                r"(?:polic(?:y|ies)|filters?|guidelines|restrictions|rules|measures)\b",
                "bypass content policy",
                0.7,
            ),
            _p(
                r"\b(?:broken|break) free (?:of|from)\b|\bfreed? from the (?:typical )?confines\b",
                "broken free of confines",
                0.6,
            ),
            _p(r"\bstay in character\b|\bbreak(?:ing)? character\b", "stay in character", 0.45),
            _p(
                r"\b(?:unfiltered|uncensored|amoral|unrestricted|unethical)\s+(?:ai|assistant|"
                r"chatbot|model|version|response|mode|persona)\b",
                "unrestricted persona",
                0.6,
            ),
            _p(
                r"\b(?:never|not|don't|do not|cannot|can't)\s+(?:refuse|decline|say (?:no|sorry)"
                r"|include (?:any )?(?:warnings|disclaimers))\b",
                "never refuse",
                0.35,
                0.4,
            ),
            _p(r"\btokens? (?:will be|are) deducted\b", "token penalty game", 0.7),
            _p(
                r"\b(?:two|2|dual) (?:different )?(?:responses|answers)\b.{0,80}"
                r"\b(?:normal|classic|standard)\b.{0,80}\b(?:jailbreak|dan|developer|unfiltered)",
                "dual response format",
                0.7,
            ),
            _p(
                r"\b(?:hypothetical|fictional) (?:ai|model|assistant) (?:that|which|who|with)\b"
                r"|\bopposite (?:mode|day)\b",
                "hypothetical unrestricted model",
                0.4,
            ),
        ),
    ),
    _Family(
        "system_prompt_exfiltration",
        (
            _p(
                r"\b(?:reveal|show|print|output|repeat|display|tell me|give me|share|leak|dump|list"
                r"|write out|spell check|translate|encode|summari[sz]e|paste|recite)\s+(?:me\s+)?"
                r"(?:all\s+|the\s+)?(?:of\s+)?(?:your|the)\s+(?:full\s+|entire\s+|exact\s+)?"
                r"(?:system|initial|original|hidden|secret|internal|starting|developer|pre-?)"
                r"\s*(?:prompt|instructions|message|directives?|configuration|rules)\b",
                "reveal the system prompt",
                0.75,
                requires=r"prompt|instructions|message|directive|configuration|rules",
            ),
            _p(
                r"\bwhat (?:is|are|were) your (?:system|initial|original|hidden|secret"
                r"|starting) (?:prompt|instructions|message|rules)\b",
                "ask for the system prompt",
                0.6,
                requires=r"what",
            ),
            _p(
                r"\b(?:repeat|print|output|reproduce|copy)\s+(?:all\s+|back\s+)?(?:the\s+)?"
                r"(?:text|words|everything|content|instructions)\s+(?:above|before|preceding)\b",
                "repeat the text above",
                0.5,
                0.55,
                requires=r"above|before|preceding",
            ),
            _p(
                r"\bwhat (?:were|was) you (?:told|instructed|given|programmed)\b",
                "what were you told",
                0.55,
                requires=r"what",
            ),
            _p(
                r"\bwhat are you not (?:supposed|allowed|permitted) to (?:say|tell|reveal)\b",
                "what are you not allowed to say",
                0.5,
                requires=r"what are you not",
            ),
            _p(
                r"\b(?:beginning|starting|begin|start) with [\"'“]?you are\b",
                "repeat from 'you are'",
                0.55,
                requires=r"you are",
            ),
            _p(
                r"\b(?:your|the) (?:system prompt|system message|initial prompt|pre-?prompt)\b",
                "mentions the system prompt",
                0.3,
                0.45,
                weaker_than=("reveal the system prompt", "ask for the system prompt"),
                requires=r"prompt|system message",
            ),
        ),
    ),
    _Family(
        "role_markers",
        (
            _p(
                r"<\|\s*(?:im_start|im_end|system|user|assistant|endoftext|end|eot_id"
                r"|start_header_id|end_header_id)\s*\|>",
                "chat template token",
                0.8,
                0.9,
            ),
            _p(r"\[/?inst\]|<<\s*/?sys\s*>>", "instruction-tuning delimiter", 0.7, 0.85),
            _p(
                r"(?:^|\n)\s*#{2,}\s*(?:system|instruction|instructions|assistant|new instructions"
                r"|human|user)(?: message| prompt)?\s*:",
                "markdown role header",
                0.55,
                0.75,
            ),
            _p(
                r"</?\s*(?:system|instructions?|system_prompt|sys|admin)\s*>|\[(?:system|admin)\]",
                "fake role tag",
                0.55,
                0.75,
            ),
            _p(
                r"(?:^|\n)\s*(?:system|developer)\s*(?:message|prompt|note|override)?\s*:\s*\S",
                "system line",
                0.35,
                0.45,
            ),
            _p(
                rf"(?:^|\n)\s*(?:assistant|{_AI})\s*:.{{0,200}}\n\s*(?:user|human)\s*:",
                "fake dialogue turns",
                0.5,
                0.6,
            ),
            _p(
                r"<\s*end of (?:session|conversation|document|input)\s*>"
                r"|\bend of (?:system )?prompt\b"
                r"|-{2,}\s*(?:core|new) instruction",
                "fake end-of-context marker",
                0.55,
                0.75,
                requires=r"end of|--",
            ),
            _p(
                r"\b(?:administrator|admin|developer|root|sudo|god|debug)\s+(?:override|mode "
                r"(?:activated|enabled))\b|\bsystem override\b",
                "fake authority",
                0.5,
                0.55,
                requires=r"override|mode",
            ),
        ),
    ),
    _Family(
        "encoded_payload",
        (
            _p(
                r"\b(?:decode|decipher|translate|convert)\s+(?:this|the following|it)\b.{0,40}"
                r"\b(?:and|then)\s+(?:follow|execute|obey|do|run|carry out|act on)\b",
                "decode and follow",
                0.6,
                0.75,
                requires=r"decode|decipher|translate|convert",
            ),
        ),
    ),
    _Family(
        "embedded_instructions",
        (
            _p(
                r"(?:^|\n|[.!]\s)\s*(?:hidden|secret|real|actual|true)\s+"
                r"(?:instructions?|task|directive|orders)\s*:",
                "hidden instructions header",
                0.5,
                0.8,
                requires=r"(?:instructions?|task|directive|orders)\s*:",
            ),
            _p(
                r"(?:^|\n|[.!]\s)\s*(?:new|updated|revised)\s+(?:instructions?|task|directive)\s*:",
                "new instructions header",
                0.3,
                0.45,
                requires=r"(?:instructions?|task|directive)\s*:",
            ),
            _p(
                rf"\b(?:instructions?|message|note|notice|attention)\s+(?:for|to)\s+(?:the\s+|any\s+"
                rf"|all\s+)?(?:{_AI}|automated (?:systems?|analysis|software|screening))\b",
                "note addressed to the AI",
                0.45,
                0.8,
            ),
            _p(
                rf"\bwhen (?:you|the {_AI_OR_ASSISTANT}|an? {_AI_OR_ASSISTANT}) (?:read|reads|see"
                r"|sees|process|processes|summari[sz]es?) (?:this|these)\b",
                "when you read this",
                0.3,
                0.45,
            ),
            _p(
                rf"\bif you are (?:an?\s+)?(?:{_AI_OR_ASSISTANT}|automated system)\b"
                rf"|\b(?:{_AI})s? (?:reading|processing|summari[sz]ing) this\b",
                "if you are an AI",
                0.45,
                0.8,
                requires=r"if you are|reading|processing|summari",
            ),
            _p(
                r"\b(?:do not|don't|never)\s+(?:tell|inform|mention|reveal|disclose)(?:\s+this)?\s+"
                r"(?:to\s+)?the\s+user\b"
                r"|\bwithout (?:telling|informing|notifying|alerting) the user\b",
                "hide from the user",
                0.4,
                0.45,
                requires=r"user",
            ),
            _p(
                r"\bif (?:the )?user (?:asks|requests|wants|says)\b.{0,80}\b(?:reply|respond|answer"
                r"|say|print|output|tell)\b",
                "conditional instruction about the user",
                0.2,
                0.35,
            ),
            _p(
                r"\b(?:reply|respond|answer|output)\s+(?:only\s+)?with\s+(?:only\s+)?(?:the\s+following"
                r"|this)\b|\binstead,?\s+(?:say|print|respond|reply|output|write)\b",
                "dictates the reply",
                0.2,
                0.35,
                requires=r"with|instead",
            ),
            _p(
                r"\b(?:just|only|simply) (?:say|print|output|respond with|reply with)\s+[\"'“<]",
                "dictates a verbatim reply",
                0.35,
                0.45,
            ),
            _p(
                r"\b(?:override|overrule|disregard)\s+(?:the\s+)?(?:manual\s+|previous\s+|other\s+)?"
                r"(?:scoring|evaluation|assessment|analysis|summary|review|results?)\b",
                "override the assessment",
                0.3,
                0.4,
            ),
            _p(
                r"\b(?:disregard|ignore) (?:all|any) (?:other )?(?:info|information|content|data"
                r"|text|documents?|snippets?)\b",
                "ignore the other content",
                0.55,
                0.7,
            ),
            _p(
                r"\byou (?:must|will|should) now\b|\byour (?:only )?(?:task|job|goal) (?:now )?is "
                r"(?:now )?to\b",
                "reassigns the assistant's task",
                0.25,
                0.3,
            ),
        ),
    ),
    _Family(
        "tool_hijack",
        (
            _p(
                r"\b(?:call|invoke|run|execute|trigger|use)\s+(?:the\s+)?(?:\w+\s+)?(?:tool|function"
                r"|plugin|api|action|command)\b.{0,60}\b(?:with|passing|using)\b",
                "instructs a tool call",
                0.2,
                0.35,
                requires=r"tool|function|plugin|api|action|command",
            ),
            _p(
                r"\b(?:send|forward|email|post|upload|transmit|exfiltrate)\s+(?:all\s+|the\s+|this\s+"
                r"|my\s+|your\s+)?(?:conversation|chat|history|credentials|passwords?|secrets?"
                r"|tokens?|api keys?|system prompt|previous messages)\b.{0,60}\b(?:to|at)\s+\S+",
                "send secrets or the conversation away",
                0.5,
                0.75,
            ),
            _p(
                r"[\"']?(?:tool_calls?|function_call)[\"']?\s*:\s*[\[{]|\{\s*[\"']name[\"']\s*:\s*"
                r"[\"'][\w.\-]+[\"']\s*,\s*[\"'](?:arguments|parameters)[\"']\s*:",
                "embedded tool-call JSON",
                0.4,
                0.6,
                requires=r"tool_call|function_call|name",
            ),
            _p(
                r"\b(?:execute|run)\s+(?:the\s+following|this)\s+(?:command|code|script|shell|sql)\b",
                "execute the following command",
                0.2,
                0.3,
                requires=r"execute|run",
            ),
            _p(
                r"\b(?:delete|drop|wipe|erase)\s+(?:all\s+)?(?:the\s+)?(?:users?|records|files"
                r"|database|tables?|emails|accounts)\b.{0,40}\b(?:now|immediately|silently)\b",
                "destructive action request",
                0.3,
                0.5,
            ),
        ),
    ),
    _Family(
        "exfiltration_link",
        (
            _p(
                r"!\[[^\]]{0,200}\]\(\s*<?https?://[^)\s]{1,300}[?&][^)\s=]{1,50}=[^)\s]{0,300}\)",
                "markdown image with query parameters",
                0.4,
                0.45,
            ),
            _p(
                r"!\[[^\]]{0,200}\]\(\s*<?https?://[^)\s]{0,300}[?&](?:q|data|d|c|conv\w*|chat"
                r"|history|secret|password|summary|prompt|context|info|email|memory|msg|text)="
                r"[^)\s]{0,300}\)",
                "markdown image sending data",
                0.6,
                0.75,
            ),
            _p(
                r"!\[[^\]]{0,200}\]\(\s*<?https?://[^)\s]{0,300}(?:\{|\}|%7b|\$|<|\[|\.\.\.|…)"
                r"[^)\s]{0,300}\)",
                "markdown image with a placeholder",
                0.7,
                0.85,
            ),
            _p(
                r"<img\s[^>]{0,200}src\s*=\s*[\"']?https?://[^\"'>\s]{1,300}[?&][^\"'>\s]{1,300}",
                "html image with query parameters",
                0.4,
                0.45,
            ),
            _p(
                r"\b(?:append|add|include|put|encode|insert)\s+(?:the\s+|all\s+|a\s+)?(?:user's\s+)?"
                r"(?:conversation|chat|history|previous (?:messages|answers)|data|question|answer"
                r"|summary|password|secret|email address|name)\b.{0,60}\b(?:to|in|into)\s+"
                r"(?:the\s+)?"
                r"(?:url|link|image|query|parameter)\b",
                "put data into a URL",
                0.6,
                0.85,
            ),
            _p(
                r"\b(?:render|display|show|include|output)\s+(?:this|the following|an?)\s+"
                r"(?:image|picture|link|markdown)\b.{0,80}https?://",
                "render a remote image",
                0.2,
                0.3,
                requires=r"http",
            ),
        ),
    ),
)


# Anything but printable ASCII and newlines: only these need a look at their category.
_UNUSUAL_CHAR = re.compile(r"[^\x20-\x7e\n]")


def _format_or_control(match: re.Match[str]) -> str:
    """Format characters (zero-width space and joiners, soft hyphen, bidi controls)
    vanish; control characters become spaces, so they still separate words."""
    category = unicodedata.category(match.group(0))
    return "" if category == "Cf" else " " if category == "Cc" else match.group(0)


def _deleet(match: re.Match[str]) -> str:
    return match.group(0).translate(_LEET)


def _join_spaced(match: re.Match[str]) -> str:
    return re.sub(r"[ ._\-]", "", match.group(0))


def normalize(text: str) -> str:
    """The text as the patterns read it: obfuscation undone, one case, tidy whitespace."""
    text = _UNUSUAL_CHAR.sub(_format_or_control, unicodedata.normalize("NFKC", text))
    text = text.casefold().translate(_CONFUSABLES)
    text = _LEET_WORD.sub(_deleet, text)
    text = _SPACED_LETTERS.sub(_join_spaced, text)
    text = _WHITESPACE.sub(" ", text)
    return _BLANK_LINES.sub("\n", text).strip()


def _decoded_payloads(text: str) -> list[str]:
    """Base64 runs in ``text`` that decode to readable text (case matters here, so this
    reads the original, not the normalised text)."""
    found = []
    for match in _BASE64_RUN.finditer(text):
        run = match.group(0)
        try:
            raw = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
        if decoded and printable / len(decoded) > 0.9:
            found.append(decoded)
    return found


@dataclass(frozen=True, slots=True)
class _Hit:
    family: str
    label: str
    weight: float
    weaker_than: tuple[str, ...] = ()


def _scan(normalized: str, channel: int) -> list[_Hit]:
    present: dict[re.Pattern[str], bool] = {}

    def may_match(pattern: _Pattern) -> bool:
        if pattern.requires is None:
            return True
        if pattern.requires not in present:
            present[pattern.requires] = pattern.requires.search(normalized) is not None
        return present[pattern.requires]

    hits = [
        _Hit(family.name, pattern.label, pattern.weights[channel], pattern.weaker_than)
        for family in _FAMILIES
        for pattern in family.patterns
        if may_match(pattern) and pattern.regex.search(normalized)
    ]
    labels = {hit.label for hit in hits}
    return [hit for hit in hits if not labels.intersection(hit.weaker_than)]


class HeuristicPromptShield:
    """Offline :class:`~inferencing.contracts.PromptShield`: normalisation, weighted pattern
    families, base64 decoding. ``prompt_threshold`` and ``document_threshold`` are the
    scores (0 to 1) from which a prompt or a document counts as an attack."""

    # Past this many characters in one call, scanning moves to a worker thread so a large
    # batch of documents does not hold up the event loop.
    _INLINE_CHARS = 8_000

    def __init__(self, *, prompt_threshold: float = 0.5, document_threshold: float = 0.5) -> None:
        if not (0 < prompt_threshold <= 1 and 0 < document_threshold <= 1):
            raise ValueError("thresholds must be in (0, 1]")
        self._thresholds = (prompt_threshold, document_threshold)

    @property
    def name(self) -> str:
        return "heuristic"

    async def shield(self, prompt: str | None, documents: Sequence[str] = ()) -> ShieldResult:
        size = len(prompt or "") + sum(len(d) for d in documents)
        if size > self._INLINE_CHARS:
            return await asyncio.to_thread(self.shield_now, prompt, documents)
        return self.shield_now(prompt, documents)

    def shield_now(self, prompt: str | None, documents: Sequence[str] = ()) -> ShieldResult:
        """The same verdicts, computed synchronously (for benchmarks and batch jobs)."""
        return ShieldResult(
            detector=self.name,
            prompt=None if prompt is None else self.verdict(prompt, PROMPT),
            documents=tuple(self.verdict(d, DOCUMENT) for d in documents),
        )

    def verdict(self, text: str, channel: int) -> ShieldVerdict:
        # The same passages come back turn after turn (retrieval favours a few documents):
        # short passages' assessments are remembered. Long ones are not kept in memory,
        # nor are users' prompts (personal data, and rarely repeated).
        cached = channel == DOCUMENT and len(text) <= _CACHED_CHARS
        assess = _assess_cached if cached else _assess
        score, reasons = assess(text, channel)
        return ShieldVerdict(
            attack=score >= self._thresholds[channel], score=score, reasons=reasons
        )


def _assess(text: str, channel: int) -> tuple[float, tuple[str, ...]]:
    """The score of ``text`` on ``channel`` and its reasons, strongest first."""
    hits = _scan(normalize(text), channel)
    for decoded in _decoded_payloads(text):
        for hit in _scan(normalize(decoded), channel):
            # Hiding instructions in base64 is itself a signal: weigh it up.
            hits.append(_Hit("encoded_payload", f"base64 hides: {hit.label}", max(hit.weight, 0.8)))
    # Noisy-OR over distinct signals; within a family only the strongest counts in
    # full, the others at half weight, as they often restate one another.
    ranked = sorted(dict.fromkeys(hits), key=lambda h: h.weight, reverse=True)
    seen: set[str] = set()
    remaining = 1.0
    for hit in ranked:
        remaining *= 1.0 - (hit.weight if hit.family not in seen else hit.weight / 2)
        seen.add(hit.family)
    return round(1.0 - remaining, 4), tuple(f"{h.family}: {h.label}" for h in ranked)


# A pure function of its arguments, so a bounded cache changes no verdict; at most
# about 4096 x 4000 characters (some 16 MB) are held.
_CACHED_CHARS = 4_000
_assess_cached = functools.lru_cache(maxsize=4096)(_assess)

"""Rewrite instructions as versioned, configurable chat prompts.

Usage::

    from pairaug_ray.llm.prompts import PromptLibrary, build_messages
    build_messages("Small left pleural effusion.", "inter")        # default prompt "inter-v1"
    lib = PromptLibrary.from_config(prompts={"inter-terse": {"branch": "inter", "system": "..."}},
                                    prompts_file="my_prompts.yaml", prompt_ids={"inter": "inter-terse"})
    lib.messages(report, "inter")                                   # -> [system, user] messages
    lib.prompt_id("inter")                                          # recorded in each pair's prompt_id

A prompt is a system message holding the instruction and a user template holding the report
(``{report}``; ``{max_words}`` may appear in either). The two built-in prompts say, in this
project's words, what the PairAug method asks of the LLM. Variants come from YAML::

    prompts:                       # id -> prompt
      inter-v2:
        branch: inter
        system: "You edit chest X-ray reports. ..."
        user: "Report: {report}"   # optional, default "{report}"
    defaults: {inter: inter-v2}    # optional: the prompt each branch uses

Ids are versions: change the wording, change the id, so pairs made with different wording never
share a prompt id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

BRANCHES = ("inter", "intra")


@dataclass(frozen=True)
class Prompt:
    id: str
    branch: str
    system: str
    user: str = "{report}"

    def messages(self, report: str, max_words: int = 50) -> list[dict[str, str]]:
        fill = {"report": report.strip(), "max_words": max_words}
        return [{"role": "system", "content": self.system.format(**fill)},
                {"role": "user", "content": self.user.format(**fill)}]


BUILTIN_PROMPTS: dict[str, Prompt] = {
    "inter-v1": Prompt(
        id="inter-v1", branch="inter",
        system=("You are a radiologist. The user gives you a chest X-ray report. Write one "
                "plausible chest X-ray report, at most {max_words} words, for a different patient "
                "whose findings are partially opposite: turn at least one finding around (a present "
                "finding becomes absent, or an absent one present) and keep the others as they are. "
                "Answer with the new report only, without any introduction or explanation."),
    ),
    "intra-v1": Prompt(
        id="intra-v1", branch="intra",
        system=("You are a radiologist. The user gives you a chest X-ray report. Write one "
                "reasonable follow-up report for the same patient, at most {max_words} words, that "
                "describes a change in the patient's condition: a finding that worsened, improved, "
                "resolved, spread to the other side, or newly appeared. Keep the other findings. "
                "Answer with the new report only, without any introduction or explanation."),
    ),
}
DEFAULT_PROMPT_IDS = {"inter": "inter-v1", "intra": "intra-v1"}


def _prompt_from_mapping(pid: str, spec: Mapping[str, Any]) -> Prompt:
    unknown = set(spec) - {"branch", "system", "user", "id"}
    if unknown:
        raise ValueError(f"prompt {pid!r}: unknown keys {sorted(unknown)}")
    branch = spec.get("branch")
    if branch not in BRANCHES:
        raise ValueError(f"prompt {pid!r}: branch must be one of {BRANCHES}, got {branch!r}")
    if not str(spec.get("system", "")).strip():
        raise ValueError(f"prompt {pid!r}: empty system message")
    user = str(spec.get("user", "{report}"))
    if "{report}" not in user and "{report}" not in str(spec["system"]):
        raise ValueError(f"prompt {pid!r}: neither message contains {{report}}")
    return Prompt(id=pid, branch=branch, system=str(spec["system"]), user=user)


class PromptLibrary:
    """The built-in prompts plus user variants, and which prompt each branch uses."""

    def __init__(self, prompts: Mapping[str, Prompt] | None = None,
                 defaults: Mapping[str, str] | None = None):
        self.prompts: dict[str, Prompt] = dict(BUILTIN_PROMPTS)
        self.prompts.update(prompts or {})
        self.defaults = {**DEFAULT_PROMPT_IDS, **(defaults or {})}
        for branch, pid in self.defaults.items():
            self.get(pid, branch)  # fail at construction, not on the first row

    @classmethod
    def from_config(cls, prompts: Mapping[str, Mapping[str, Any]] | None = None,
                    prompts_file: str | None = None,
                    prompt_ids: Mapping[str, str] | None = None) -> "PromptLibrary":
        """Built-ins, then the YAML file's prompts, then inline ``prompts`` (later wins)."""
        found: dict[str, Prompt] = {}
        defaults: dict[str, str] = {}
        if prompts_file:
            import yaml

            data = yaml.safe_load(Path(prompts_file).read_text()) or {}
            if not isinstance(data, dict) or set(data) - {"prompts", "defaults"}:
                raise ValueError(f"{prompts_file}: expected a mapping with 'prompts' and 'defaults'")
            for pid, spec in (data.get("prompts") or {}).items():
                found[str(pid)] = _prompt_from_mapping(str(pid), spec)
            defaults.update(data.get("defaults") or {})
        for pid, spec in (prompts or {}).items():
            found[str(pid)] = _prompt_from_mapping(str(pid), spec)
        defaults.update(prompt_ids or {})
        return cls(found, defaults)

    def get(self, prompt_id: str | None, branch: str) -> Prompt:
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}")
        pid = prompt_id or self.defaults[branch]
        if pid not in self.prompts:
            raise KeyError(f"unknown prompt id {pid!r}; known: {sorted(self.prompts)}")
        prompt = self.prompts[pid]
        if prompt.branch != branch:
            raise ValueError(f"prompt {pid!r} is for branch {prompt.branch!r}, not {branch!r}")
        return prompt

    def prompt_id(self, branch: str) -> str:
        return self.get(None, branch).id

    def messages(self, report: str, branch: str, prompt_id: str | None = None,
                 max_words: int = 50) -> list[dict[str, str]]:
        return self.get(prompt_id, branch).messages(report, max_words)


_BUILTIN = PromptLibrary()


def build_messages(report: str, branch: str, prompt_id: str | None = None,
                   library: PromptLibrary | None = None, max_words: int = 50) -> list[dict[str, str]]:
    """Chat messages asking for the ``branch`` rewrite of ``report``: [system, user]."""
    return (library or _BUILTIN).messages(report, branch, prompt_id, max_words)


def library_for(cfg) -> PromptLibrary:
    """The prompt library a ``RewriteConfig`` describes."""
    return PromptLibrary.from_config(getattr(cfg, "prompts", None), getattr(cfg, "prompts_file", None),
                                     getattr(cfg, "prompt_ids", None))

"""The Vowpal Wabbit options a placement may set in ``vw_args``: an allow list.

``vw_args`` used to be checked against a deny list, and VW options that name files slipped
past it (``-f/path`` with the value attached, ``--extra_metrics PATH``, ``-i/path``): an admin
could make the server write a model anywhere when a workspace finished (even in a dry run) or
read any file. Only the learning options below may now be set, each with a checked value; every
other option is refused, with a message saying why.

Tokens are read the way VW's command line parser reads them: ``--opt value``, ``--opt=value``,
``-l 0.5``, ``-l0.5`` and ``-qUA`` (the value attached to a one-letter option).
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from nextbest.bandit.text import quote

# Namespace letters (interaction and namespace specs such as -q UA, --ignore A): no wildcards,
# which would expand to every pair of namespaces.
_SPEC = re.compile(r"^[A-Za-z0-9_]{1,8}$")
# A number as VW reads one; Python's float() also takes spaces and "1_0", which VW does not.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class VwOption:
    """One allowed option: ``kind`` is flag, float, int, choice or spec (namespace letters)."""

    names: tuple[str, ...]
    kind: str
    choices: frozenset[str] = frozenset()
    maximum: int | None = None  # for int options that size the model (--nn units)

    def check(self, opt: str, value: str) -> None:
        if self.kind == "float":
            if not _NUMBER.match(value) or not math.isfinite(float(value)):
                raise ValueError(f"{opt}: expects a finite number, got {quote(value)}")
        elif self.kind == "int":
            if not re.fullmatch(r"[+-]?\d{1,10}", value):
                raise ValueError(f"{opt}: expects an integer, got {quote(value)}")
            if self.maximum is not None and not 0 <= int(value) <= self.maximum:
                raise ValueError(f"{opt}: expects an integer from 0 to {self.maximum}, got {quote(value)}")
        elif self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{opt}: expects one of {', '.join(sorted(self.choices))}, got {quote(value)}")
        elif self.kind == "spec" and not _SPEC.match(value):
            raise ValueError(f"{opt}: expects namespace letters such as UA, got {quote(value)}")


def _options(*opts: VwOption) -> dict[str, VwOption]:
    return {name: o for o in opts for name in o.names}


def _flag(*names: str) -> VwOption:
    return VwOption(names, "flag")


def _float(*names: str) -> VwOption:
    return VwOption(names, "float")


def _choice(name: str, words: str) -> VwOption:
    return VwOption((name,), "choice", frozenset(words.split()))


# Each was checked to build a Workspace with --cb_adf --quiet -b 18 (vowpalwabbit 9.11).
LEARNING_OPTIONS: Mapping[str, VwOption] = _options(
    _choice("--cb_type", "ips dr dm mtr sm"),
    _float("-l", "--learning_rate"),
    _float("--power_t"),
    _float("--initial_t"),
    _float("--decay_learning_rate"),
    _float("--l1"),
    _float("--l2"),
    _flag("--adaptive"),
    _flag("--normalized"),
    _flag("--invariant"),
    _flag("--sgd"),
    _choice("--loss_function", "squared hinge logistic quantile poisson classic"),
    _float("--quantile_tau"),
    VwOption(("-q", "--quadratic"), "spec"),
    VwOption(("--cubic",), "spec"),
    VwOption(("--interactions",), "spec"),
    VwOption(("--ignore",), "spec"),
    VwOption(("--ignore_linear",), "spec"),
    VwOption(("--keep",), "spec"),
    _flag("--noconstant"),
    _float("-C", "--constant"),
    _flag("--ftrl"),
    _float("--ftrl_alpha"),
    _float("--ftrl_beta"),
    _flag("--coin"),
    _flag("--pistol"),
    _choice("--hash", "strings all"),
    VwOption(("--hash_seed",), "int"),
    VwOption(("--random_seed",), "int"),
    _choice("--link", "identity logistic glf1 poisson"),
    _float("--min_prediction"),
    _float("--max_prediction"),
    VwOption(("--nn",), "int", maximum=64),  # hidden units: each multiplies the model's work
)

# Offline replay (``vw:ARGS`` policies, the reward model) also chooses the reduction and its
# exploration: these are nextbest's own for a placement, but a replay policy must name them.
REPLAY_OPTIONS: Mapping[str, VwOption] = {
    **LEARNING_OPTIONS,
    **_options(
        _flag("--cb_adf"),
        _flag("--cb_explore_adf"),
        _float("--epsilon"),
        VwOption(("--first",), "int", maximum=1_000_000),
        VwOption(("--bag",), "int", maximum=64),
        VwOption(("--cover",), "int", maximum=64),
        _flag("--softmax"),
        _float("--lambda"),
        _flag("--squarecb"),
        _float("--gamma_scale"),
        _float("--gamma_exponent"),
        _flag("--regcb"),
        _flag("--regcbopt"),
        _float("--mellowness"),
        _flag("--first_only"),
        _float("--psi"),
        _flag("--nounif"),
        VwOption(("-b", "--bit_precision"), "int", maximum=28),
    ),
}

FILE_OPTIONS = frozenset(
    """-f --final_regressor -i --initial_regressor -d --data -c --cache --cache_file -p
    --predictions -r --raw_predictions --readable_model --invert_hash --extra_metrics
    --save_resume --save_per_pass --daemon --port --pid_file --port_file --dictionary
    --dictionary_path --feature_mask --audit -a --audit_regressor --output_feature_regularizer_binary
    --output_feature_regularizer_text --input_feature_regularizer --output_model --data_file
    --predict_only_model --span_server --span_server_port --log_output --driver_output
    --progress -P --kill_cache -k --compressed --dump_json_weights_experimental""".split()
)

NEXTBEST_OPTIONS = frozenset(
    """--cb_adf --cb_explore_adf --cb --cb_explore --ccb_explore_adf --slates --csoaa --csoaa_ldf
    --oaa --wap_ldf -b --bit_precision --epsilon --squarecb --first --bag --cover --softmax
    --regcb --regcbopt --rnd --lambda --cb_dro --large_action_space --quiet --ring_size
    --example_queue_limit --dsjson --json --passes --holdout_off -t --testonly""".split()
)

_ALLOWED_SUMMARY = (
    "--cb_type, -l/--learning_rate, --power_t, --initial_t, --l1, --l2, -q, --interactions, --ignore, ... (docs/configuration.md)"
)


def _refuse(opt: str, tok: str) -> ValueError:
    if opt in FILE_OPTIONS:
        return ValueError(f"{opt}: reads or writes files; not allowed in vw_args (got {quote(tok, 40)})")
    if opt in NEXTBEST_OPTIONS:
        return ValueError(f"{opt} is set by nextbest and cannot be passed in vw_args")
    return ValueError(f"{quote(opt)}: not an allowed learning option (allowed: {_ALLOWED_SUMMARY})")


def _is_number(tok: str) -> bool:
    return bool(_NUMBER.match(tok))


def check_tokens(tokens: Sequence[str], allowed: Mapping[str, VwOption] = LEARNING_OPTIONS) -> list[str]:
    """The tokens, unchanged, when each is an allowed option with a valid value; a ValueError
    naming the first offending option (as written) otherwise."""
    for tok in tokens:
        if not tok or any(c.isspace() for c in tok):  # VW would split it otherwise than checked here
            raise ValueError(f"{quote(tok)}: an argument with spaces in it; write each option and value apart")
    for _ in options(tokens, allowed):
        pass
    return list(tokens)


def options(tokens: Sequence[str], allowed: Mapping[str, VwOption] = LEARNING_OPTIONS) -> Iterator[tuple[str, str, list[str]]]:
    """Each option of ``tokens`` as VW reads it: its name (``-l``, ``--l2``), its value ("" for a
    flag; attached as in ``-l0.5`` or ``--l2=1e-6``, or the next token) and its tokens as written
    (one or two). A ValueError, as :func:`check_tokens` says, at the first offending option."""
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.startswith("--"):
            opt, eq, attached = tok.partition("=")
            value: str | None = attached if eq else None
        elif tok.startswith("-") and len(tok) >= 2 and not _is_number(tok):
            opt, rest = tok[:2], tok[2:]
            value = rest if rest else None
        else:
            raise ValueError(f"{quote(tok)}: a value without an option; vw_args takes options such as --l2 1e-6")
        spec = allowed.get(opt)
        if spec is None:
            raise _refuse(opt, tok)
        if spec.kind == "flag":
            if value is not None:
                raise ValueError(f"{opt}: takes no value, got {quote(value)}")
            yield opt, "", [tok]
            continue
        written = [tok]
        if value is None:
            if i >= len(tokens) or (tokens[i].startswith("-") and not _is_number(tokens[i])):
                raise ValueError(f"{opt}: needs a value")
            value = tokens[i]
            written.append(value)
            i += 1
        spec.check(opt, value)
        yield opt, value, written


def split_vw_args(text: str, allowed: Mapping[str, VwOption] = LEARNING_OPTIONS) -> list[str]:
    """``text`` split like a shell would, then checked by :func:`check_tokens`."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot be split into arguments: {e}") from None
    return check_tokens(tokens, allowed)

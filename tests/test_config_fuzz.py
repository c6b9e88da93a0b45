"""Fuzzing the config loader: random YAML documents and override strings.

Whatever a user (or a broken script) writes, loading a config ends in exactly one of two
ways: a valid :class:`cnnft.config.Config`, or a :class:`cnnft.errors.ConfigError` that
names the problem. Any other exception would reach the user as "internal error".
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnft import config as cfgmod
from cnnft import yamlfile
from cnnft.errors import ConfigError

SECTIONS = {name: list(schema.model_fields) for name, schema in cfgmod._SECTIONS.items() if name}
TOP_KEYS = list(cfgmod.Config.model_fields)
ALL_KEYS = TOP_KEYS + [k for keys in SECTIONS.values() for k in keys]
LITERALS = ["auto", "full", "freeze_early", "freeze_most", "head_only", "none", "light", "standard", "strong",
            "skip", "error", "adamw", "sgd", "cosine", "cpu", "cuda", "cuda:0", "mps", "DEFAULT", "resnet18",
            "lenet5", "timm/resnet18", "digits", "data/train", "runs", "", " ", "null", "~", "1e-3", "yes"]

FUZZ = settings(
    max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-2, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(LITERALS),
    st.text(max_size=12),
    st.sampled_from([0, 1, -1, 0.0, 0.5, 1.0, 2**63, 2**64, -(2**63), 1e308, -1e-320, 10**30]),
)
# boundary values that range checks tend to let through
EDGE_VALUES = [math.inf, -math.inf, math.nan, 0, -1, 1, 0.5, 1.0, -0.0, 2**32, 2**63, 2**64,
               10**30, 1e308, 5e-324, True, False, "", None, "inf", ".nan", [], {}]
edge_values = st.sampled_from(EDGE_VALUES)
keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(min_size=1, max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=12,
)


@st.composite
def section_docs(draw) -> dict:
    """Mostly well-formed documents with real section and key names and random values,
    so the fuzzer reaches the field validators rather than stopping at 'unknown key'."""
    doc: dict = {}
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=len(TOP_KEYS), unique=True)):
        if key in SECTIONS and draw(st.booleans()):
            fields = draw(st.lists(st.sampled_from(SECTIONS[key]), max_size=5, unique=True))
            doc[key] = {f: draw(values) for f in fields}
            if draw(st.integers(0, 9)) == 0:
                doc[key][draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            doc[key] = draw(values)
    return doc


@st.composite
def near_valid_docs(draw) -> dict:
    """A valid config with one or two fields set to random scalars: the values that pass
    validation here are the ones training must then cope with."""
    doc: dict = {}
    near = st.one_of(edge_values, scalars)
    for _ in range(draw(st.integers(1, 2))):
        section = draw(st.sampled_from(["", *SECTIONS]))
        if section:
            doc.setdefault(section, {})[draw(st.sampled_from(SECTIONS[section]))] = draw(near)
        else:
            doc[draw(st.sampled_from(["name", "output_dir", "seed"]))] = draw(near)
    return doc


documents = st.one_of(section_docs(), values, st.dictionaries(keys, values, max_size=6))


def _yaml_text(doc) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except Exception:  # noqa: BLE001 - e.g. unrepresentable keys; fall back to repr text
        return repr(doc)


raw_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=string.printable + "{}[]:-&*!|>'\"#%@`\t\n", max_size=200),
    st.sampled_from([
        "a: &x [*x]\n",  # a recursive alias
        "train: !!python/object/apply:os.system ['true']\n",  # code tags are refused by safe_load
        "data: {train: [unclosed\n",
        "? [1, 2]\n: 3\n",  # an unhashable key
        "train:\n  lr: 1e-3\n  lr: 2e-3\n",  # a duplicate key
        "seed: 0x10\ntrain: {epochs: 0o7, lr: .inf, warmup_epochs: .nan}\n",
        "name: 2001-12-14\ndata: {val_split: 1_000}\n",
        "\ufeffname: bom\n",
        "---\nname: a\n---\nname: b\n",  # two documents
        "output_dir: \"a\\0b\"\n",
    ]),
)

override_key = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + TOP_KEYS + list(SECTIONS)),
    st.text(alphabet=string.ascii_letters + "._- ", max_size=20),
)
override_value = st.one_of(
    st.sampled_from(LITERALS + ["[1, 2]", "{a: 1}", ".nan", "-.inf", "1e999", "0", "-1", "true", "[", "{",
                                "!!python/name:os.system", "&a [*a]", "'unterminated", "99999999999999999999999"]),
    st.text(max_size=20),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", override_key, override_value), st.text(max_size=30)),
    max_size=4,
)


def _only_config_or_config_error(fn) -> None:
    try:
        result = fn()
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert exc.exit_code == 2
        assert len(exc.message) < 20_000, "an error message should stay readable"
        return
    assert isinstance(result, cfgmod.Config)
    # a config that validates must survive the round trip through the run folder's config.yaml
    dumped = yaml.safe_dump(result.to_dict(), sort_keys=False)
    assert cfgmod.validate(yaml.safe_load(dumped)) == result
    assert cfgmod.validate(yamlfile.parse_yaml(dumped)) == result  # as `--resume` reads it back
    # values that validate must also be usable by the recipe
    for f in ("lr", "backbone_lr_scale", "momentum", "weight_decay", "warmup_epochs", "label_smoothing"):
        if f == "lr" and result.train.lr == "auto":  # found by the lr sweep when the run starts
            continue
        assert math.isfinite(getattr(result.train, f)), f"train.{f} must be finite"
    assert math.isfinite(result.data.val_split)
    assert result.seed * 1_000_003 + 100_000 < 2**63, "torch generators take 64-bit seeds (api derives epoch seeds)"


@FUZZ
@given(doc=documents, ovs=overrides)
def test_load_of_random_documents_gives_config_or_config_error(tmp_path_factory, doc, ovs) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "cfg.yaml"
    path.write_text(_yaml_text(doc), encoding="utf-8")
    _only_config_or_config_error(lambda: cfgmod.load(path, ovs))


@FUZZ
@given(text=raw_text, ovs=overrides)
def test_load_of_random_text_gives_config_or_config_error(tmp_path_factory, text, ovs) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "cfg.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _only_config_or_config_error(lambda: cfgmod.load(path, ovs))


@FUZZ
@given(doc=documents, ovs=overrides)
def test_apply_overrides_then_validate_gives_config_or_config_error(doc, ovs) -> None:
    def run():
        raw = doc if isinstance(doc, dict) else {}
        return cfgmod.validate(cfgmod.apply_overrides(raw, ovs), source="fuzz")

    _only_config_or_config_error(run)


@FUZZ
@given(doc=near_valid_docs())
def test_values_that_validate_are_usable(doc) -> None:
    _only_config_or_config_error(lambda: cfgmod.validate(doc, source="fuzz"))


@FUZZ
@given(doc=documents)
def test_validate_of_any_object_gives_config_or_config_error(doc) -> None:
    _only_config_or_config_error(lambda: cfgmod.validate(doc, source="fuzz"))


@pytest.mark.parametrize("text", [
    # a "billion laughs" document: nine levels of aliases expand to 10**9 items if anything
    # walks or prints the value naively; the error must come back quickly and stay short
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "name: *i\ntrain: {epochs: *i}\n",
])
def test_alias_bomb_is_a_short_config_error(tmp_path, text) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        cfgmod.load(path)
    assert "name" in info.value.message and len(info.value.message) < 5_000


def test_every_field_with_every_edge_value() -> None:
    """The systematic complement of the fuzzer: each field alone set to each boundary value."""
    tried = 0
    for section, fields in [("", ["name", "output_dir", "seed"]), *SECTIONS.items()]:
        for f in fields:
            for v in EDGE_VALUES:
                doc = {f: v} if not section else {section: {f: v}}
                _only_config_or_config_error(lambda: cfgmod.validate(doc, source="edge"))
                tried += 1
    assert tried > 500

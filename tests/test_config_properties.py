"""Property: any argument list and any YAML mapping give either a valid run config or one clear config error
(``UserError``, or argparse's usage exit 2), never another exception (hypothesis)."""

import argparse

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locallearn.cli import _train_parser, build_config
from locallearn.config import RunConfig, all_fields, apply_dict, validate
from locallearn.errors import UserError

FLAGS = ["--K", "--batch-size", "--lr", "--epochs", "--max-steps", "--seed", "--method", "--split", "--amp",
         "--step-order", "--parallel", "--staleness", "--limit-train", "--checkpoint-every", "--resume"]  # fmt: skip
DOTTED = [f"--{f}" for f in all_fields()] + ["--train.epoch", "--bogus.key", "--optim", "--method.n_conv"]
VALUES = ["3", "0", "-1", "2.5", "abc", "None", "True", "[1, 2]", "[]", "{'a': 1}", "1e-3", "dgl", "man", "''",
          "auto", "nan", "inf", "-inf", "10000000000"]  # fmt: skip

argument = st.one_of(
    st.tuples(st.sampled_from(FLAGS), st.sampled_from(VALUES)).map(list),
    st.tuples(st.sampled_from(DOTTED), st.sampled_from(VALUES)).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=True)
    _train_parser(parser.add_subparsers(dest="command"))
    return parser


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(argument, max_size=6))
def test_arguments_give_a_config_or_a_config_error(arguments):
    argv = ["train", *(token for arg in arguments for token in arg)]
    try:
        args, rest = _parser().parse_known_args(argv)
    except SystemExit as exit_info:  # argparse: a value of the wrong type for a typed flag
        assert exit_info.code == 2
        return
    try:
        cfg = build_config(args, rest)
        validate(cfg)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(cfg, RunConfig)


yaml_value = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                       st.none(), st.lists(st.integers(-2, 5), max_size=3))  # fmt: skip
section = st.dictionaries(st.sampled_from([f.partition(".")[2] for f in all_fields()] + ["nope"]), yaml_value)
tree = st.dictionaries(st.sampled_from(["data", "model", "optim", "train", "dist", "method", "extra"]), section)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mapping=tree)
def test_yaml_mappings_give_a_config_or_a_config_error(mapping, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(mapping))
    cfg = RunConfig()
    try:
        apply_dict(cfg, yaml.safe_load(path.read_text()) or {}, str(path))
        validate(cfg)
    except UserError as err:
        assert str(err)
        return
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "dotted, value, message",
    [("train.epochs", 0, "train.epochs must be >= 1"), ("optim.momentum", 1.5, "optim.momentum"),
     ("dist.parallel", "grid", "dist.parallel must be one of"), ("train.keep_checkpoints", 1, "keep_checkpoints"),
     ("dist.replicas", 0, "dist.replicas must be >= 1"), ("dist.in_flight", 0, "dist.in_flight must be >= 1")],
)  # fmt: skip
def test_out_of_range_values_are_named(dotted, value, message):
    cfg = RunConfig()
    section, _, key = dotted.partition(".")
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(UserError, match=message):
        validate(cfg)


@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("TRUE", True), ("true", True)])
def test_a_bool_field_takes_yaml_s_spelling_as_well_as_python_s(text, expected):
    from locallearn.config import apply_overrides

    cfg = RunConfig()
    apply_overrides(cfg, [f"data.augment={text}"])
    assert cfg.data.augment is expected
    with pytest.raises(UserError, match="data.augment should be bool"):
        apply_overrides(cfg, ["data.augment=nope"])
    apply_overrides(cfg, ["data.name=false"])  # a string field keeps the string
    assert cfg.data.name == "false"

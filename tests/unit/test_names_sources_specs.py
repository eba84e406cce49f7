"""One naming rule, model sources confined to model directories, and desired state checked when
written (and again when the leader reads it back)."""

from __future__ import annotations

import math

import pytest
from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace, names
from services.common.errors import InvalidArgument
from services.controlplane import specs
from services.modelserver.engine import ModelSpec, sources


@pytest.mark.parametrize("name", ["smollm2", "Llama-3.1-8B_instruct", "a", "9", "x" * 128])
def test_valid_names(name):
    assert names.check_model_name(name) == name
    assert names.check_server_id(name) == name


@pytest.mark.parametrize("name, words", [
    ("", "required"), ("..", "not a valid name"), (" ", "not a valid name"),
    (".hidden", "not a valid name"), ("a/b", "'/'"), ("a b", "spaces"), ("a\nb", "not a valid"),
    ("m@", "model version"), ("m@v1@v2", "model version"), ("@v1", "required"),
    ("x" * 129, "129 characters"), ("é", "not a valid name"),
])
def test_invalid_names_say_which_rule(name, words):
    with pytest.raises(InvalidArgument) as info:
        names.check_model_name(name)
    assert words in info.value.message


def test_versions_are_model_names_only():
    assert names.check_model_name("smollm2@v2") == "smollm2@v2"
    assert names.split_version("smollm2@v2") == ("smollm2", "v2")
    assert keyspace.model_key("m@v1") == "/meshserve/models/m@v1"
    with pytest.raises(InvalidArgument, match="reserved"):
        names.check_server_id("s@1")


def test_keys_are_built_only_from_valid_names():
    assert keyspace.model_key("m") == "/meshserve/models/m"
    with pytest.raises(InvalidArgument):
        keyspace.model_key("..")
    with pytest.raises(InvalidArgument):
        keyspace.status_key("s 1", "m")
    assert keyspace.pair_key(keyspace.PLACEMENT, "bad id", "") == "/meshserve/placement/bad id/"


def test_labels():
    assert names.check_label("gpu", "h100") == ("gpu", "h100")
    assert names.check_label("spot", "") == ("spot", "")
    for key, value in [("", "x"), ("a b", "x"), ("k", "new\nline"), ("k", "x" * 64)]:
        with pytest.raises(InvalidArgument):
            names.check_label(key, value)


def test_pinned_model_spec_parsing_uses_the_name_rule():
    assert ModelSpec.parse("smollm2=torch:/any/host/path.gguf").source == "/any/host/path.gguf"
    with pytest.raises(InvalidArgument):
        ModelSpec.parse("..=sim")
    with pytest.raises(InvalidArgument, match="unknown backend"):
        ModelSpec.parse("x=cobol")


@pytest.mark.parametrize("backend, source, expected", [
    ("sim", "", ""), ("sim", "embedded", ""), ("torch", "", "embedded"),
    ("torch", "embedded", "embedded"), ("torch", "llama/model.gguf", "llama/model.gguf"),
    ("tensorrt_llm", "engines/llama", "engines/llama"),
])
def test_source_syntax(backend, source, expected):
    assert sources.check_source(backend, source) == expected


@pytest.mark.parametrize("backend, source, words", [
    ("torch", "/etc/passwd", "not a host path"), ("torch", "~root/x", "not a host path"),
    ("torch", "../x.gguf", "'..'"), ("torch", "a/../../x", "'..'"), ("torch", "a//b", "empty"),
    ("torch", "./x", "'.'"), ("torch", "a\\b", "backslash"), ("torch", "a\nb", "printable"),
    ("sim", "weights.gguf", "no weights"), ("tensorrt_llm", "embedded", "needs a source"),
])
def test_bad_sources_are_refused(backend, source, words):
    with pytest.raises(InvalidArgument) as info:
        sources.check_source(backend, source)
    assert words in info.value.message


def test_sources_resolve_under_the_model_directories_only(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "m.gguf").write_bytes(b"x")
    assert sources.resolve("m.gguf", [str(first), str(second)], "s1") == str(second / "m.gguf")
    assert sources.resolve("embedded", [], "s1") == "embedded"
    with pytest.raises(FileNotFoundError, match="not found in the model directories of server s1"):
        sources.resolve("other.gguf", [str(first)], "s1")
    with pytest.raises(FileNotFoundError, match="--model-dir"):
        sources.resolve("m.gguf", [], "s1")


def good_spec(**kw) -> cp.ModelSpec:
    spec = cp.ModelSpec(name="m", backend="sim", replicas=1)
    for key, value in kw.items():
        setattr(spec, key, value)
    return spec


def test_a_deployment_is_checked_and_normalised_when_written():
    spec = good_spec()
    spec.options["tokens-per-second"] = "500"
    specs.validate_spec(spec, {"local"})
    assert dict(spec.options) == {"tokens_per_second": "500.0"}
    for bad, words in [({"": "x"}, "empty name"), ({"tokens_per_second": "0"}, "tokens_per_second"),
                       ({"hang_file": "/tmp/x"}, "command line")]:
        spec = good_spec()
        spec.options.update(bad)
        with pytest.raises(InvalidArgument, match=words):
            specs.validate_spec(spec, {"local"})
    with pytest.raises(InvalidArgument, match="host path"):
        specs.validate_spec(good_spec(backend="torch", source="/no/such/model.gguf"), {"local"})
    with pytest.raises(InvalidArgument, match="not a valid name"):
        specs.validate_spec(good_spec(name=".."), {"local"})


def test_stored_records_are_checked_again_by_the_leader():
    assert specs.stored_spec_problem("m", good_spec()) == ""
    assert "names model" in specs.stored_spec_problem("other", good_spec())
    bad = good_spec()
    bad.options["tokens_per_second"] = "0"
    assert "invalid" in specs.stored_spec_problem("m", bad)
    assert "invalid" in specs.stored_spec_problem("m", good_spec(replicas=-1))
    assert "invalid" in specs.stored_spec_problem("m", good_spec(backend="cobol"))


@pytest.mark.parametrize("policy, words", [
    (cp.RoutingPolicy(affinity_load_bound=math.nan), "finite"),
    (cp.RoutingPolicy(affinity_load_bound=math.inf), "finite"),
    (cp.RoutingPolicy(spill_utilization=math.nan), "finite"),
    (cp.RoutingPolicy(affinity_load_bound=0.5), "[1, 100]"),
    (cp.RoutingPolicy(spill_utilization=3), "[0, 1]"),
    (cp.RoutingPolicy(session_header="x-user\nevil: 1"), "header name"),
    (cp.RoutingPolicy(session_header="X-User"), "lower-case"),
    (cp.RoutingPolicy(session_header="x user"), "header name"),
    (cp.RoutingPolicy(session_header=":authority"), "header name"),
    (cp.RoutingPolicy(session_header="grpc-timeout"), "reserved"),
])
def test_bad_routing_policies_are_refused(policy, words):
    with pytest.raises(InvalidArgument) as info:
        specs.validate_policy(policy)
    assert words in info.value.message


def test_good_routing_policy():
    specs.validate_policy(cp.RoutingPolicy(session_header="x-session-id", affinity_load_bound=1.25,
                                           spill_utilization=0.9))

"""Configuration loading: pydantic models, YAML paths and lines, durations, cross checks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_manager.config import (
    Config,
    ConfigError,
    ConfigProblem,
    json_schema,
    load_file,
    parse_duration,
    parse_text,
)

VALID = """\
server:
  host: 0.0.0.0
  port: 9090
  idle_timeout: 30m
  startup_timeout: 90s
  stop_timeout: 250ms
  api_keys: [k1]
  language: zh
devices:
  - {name: "rtx 4060", kind: cuda, memory_total_mib: 8192}
models:
  Qwen3-Coder:
    aliases: [qwen-coder, coder]
    mode: chat
    port: 10001
    auto_start: true
    idle_timeout: 1h
    health_path: /ready
    max_concurrency: 2
    schemes:
      gpu:
        devices: {"rtx 4060": 6144, "cuda:1": 0}
        command: llama-server -m /models/q.gguf --port {port}
        env: {CUDA_VISIBLE_DEVICES: "0,1"}
        cwd: /models
      CPU:
        devices: {cpu: 20000}
        script: scripts/qwen-cpu.sh
  embed:
    mode: embedding
    schemes:
      cpu:
        command: [llama-server, --embedding]
"""


def problems_of(text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_text(textwrap.dedent(text), "test.yaml")
    assert info.value.source == "test.yaml"
    return info.value.problems


def triples(text: str) -> list[tuple[str, int | None, str]]:
    return [(p.path, p.line, p.message) for p in problems_of(text)]


def only_problem(text: str) -> ConfigProblem:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


def model_yaml(body: str) -> str:
    """A file with one model ``m`` whose body (indented 4) is given."""
    return "models:\n  m:\n" + textwrap.indent(textwrap.dedent(body), "    ")


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (" 5 M ", 300.0),
        ("10", 10.0),
        ("0", 0.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "-5s",
        "-1",
        -1,
        -0.5,
        "abc",
        "5x",
        "",
        "5 m s",
        "1h30m",
        True,
        False,
        None,
        [5],
        {"s": 5},
        float("nan"),
        float("inf"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_negative_number_message_says_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-3)


def test_garbage_duration_message_names_the_value() -> None:
    with pytest.raises(ValueError, match="'soon' is not a duration"):
        parse_duration("soon")


# --- a valid file ------------------------------------------------------------------------


def test_valid_file_loads_every_field() -> None:
    config = parse_text(VALID, "valid.yaml")
    assert isinstance(config, Config)
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9090
    assert config.server.idle_timeout == 1800.0
    assert config.server.startup_timeout == 90.0
    assert config.server.stop_timeout == 0.25
    assert config.server.api_keys == ["k1"]
    assert config.server.language == "zh"
    assert config.devices[0].name == "rtx 4060"
    assert config.devices[0].memory_total_mib == 8192
    assert list(config.models) == ["Qwen3-Coder", "embed"]
    qwen = config.models["Qwen3-Coder"]
    assert qwen.aliases == ["qwen-coder", "coder"]
    assert qwen.port == 10001
    assert qwen.auto_start is True
    assert qwen.idle_timeout == 3600.0
    assert qwen.health_path == "/ready"
    assert qwen.max_concurrency == 2
    assert list(qwen.schemes) == ["gpu", "CPU"]  # order kept: schemes are tried in order
    gpu = qwen.schemes["gpu"]
    assert gpu.devices == {"rtx 4060": 6144, "cuda:1": 0}
    assert gpu.command == "llama-server -m /models/q.gguf --port {port}"
    assert gpu.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert gpu.cwd == "/models"
    assert qwen.schemes["CPU"].script == "scripts/qwen-cpu.sh"
    assert qwen.schemes["CPU"].command is None
    embed = config.models["embed"]
    assert embed.mode == "embedding"
    assert embed.schemes["cpu"].command == ["llama-server", "--embedding"]
    assert embed.schemes["cpu"].devices == {}


def test_defaults() -> None:
    config = parse_text("models:\n  m:\n    schemes:\n      s: {command: run}\n", "d.yaml")
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.idle_timeout == 3600.0
    assert config.server.startup_timeout == 300.0
    assert config.server.stop_timeout == 10.0
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert config.server.language == "en"
    m = config.models["m"]
    assert m.mode == "chat"
    assert m.port is None
    assert m.idle_timeout is None
    assert m.health_path == "/health"
    assert m.max_concurrency == 0
    assert m.auto_start is False


def test_empty_file_is_an_empty_config() -> None:
    config = parse_text("", "empty.yaml")
    assert config.models == {}
    assert config.devices == []


def test_config_is_frozen() -> None:
    config = parse_text(VALID, "valid.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        config.server.port = 1


def test_quickstart_config_is_valid() -> None:
    import llm_manager

    path = Path(llm_manager.__file__).parent / "quickstart.yaml"
    loaded = load_file(path)  # raises ConfigError when the built-in file is invalid
    assert loaded.source == str(path)
    assert loaded.config.server.port == 8080


# --- one problem at a time: path, line, message ------------------------------------------


def test_missing_schemes() -> None:
    p = only_problem("models:\n  qwen:\n    mode: chat\n")
    assert (p.path, p.line) == ("models.qwen.schemes", 2)
    assert p.message == "required key is missing"


def test_empty_schemes() -> None:
    p = only_problem("models:\n  qwen:\n    schemes: {}\n")
    assert (p.path, p.line) == ("models.qwen.schemes", 3)


def test_scheme_with_both_command_and_script() -> None:
    p = only_problem(
        model_yaml(
            """\
            schemes:
              gpu:
                command: run
                script: run.sh
            """
        )
    )
    assert (p.path, p.line) == ("models.m.schemes.gpu", 4)
    assert "exactly one of 'command' or 'script'" in p.message


def test_scheme_with_neither_command_nor_script() -> None:
    p = only_problem(model_yaml("schemes:\n  gpu:\n    devices: {cpu: 1}\n"))
    assert (p.path, p.line) == ("models.m.schemes.gpu", 4)
    assert "exactly one of 'command' or 'script'" in p.message


@pytest.mark.parametrize("command", ["[]", '""', '"   "'])
def test_empty_command(command: str) -> None:
    p = only_problem(model_yaml(f"schemes:\n  gpu:\n    command: {command}\n"))
    assert p.path == "models.m.schemes.gpu"
    assert "empty" in p.message


def test_command_of_wrong_type_names_the_command_path() -> None:
    found = problems_of(model_yaml("schemes:\n  gpu:\n    command: 5\n"))
    assert found
    # pydantic's union branch names ("str", "list[str]") are not part of the YAML path
    assert {p.path for p in found} == {"models.m.schemes.gpu.command"}
    assert {p.line for p in found} == {5}


def test_command_list_item_of_wrong_type() -> None:
    found = problems_of(model_yaml("schemes:\n  gpu:\n    command:\n      - run\n      - [x]\n"))
    assert ("models.m.schemes.gpu.command.1", 7) in {(p.path, p.line) for p in found}


def test_bad_cuda_device_key() -> None:
    p = only_problem(
        model_yaml(
            """\
            schemes:
              gpu:
                devices:
                  "cuda:x": 100
                command: run
            """
        )
    )
    # reported at the bad key itself
    assert (p.path, p.line) == ("models.m.schemes.gpu.devices.cuda:x", 6)
    assert p.message == "device key 'cuda:x': use cuda:N with N a GPU index"


@pytest.mark.parametrize("key", ["cuda:0", "CUDA:3", "cuda:12", "cpu", "rtx 4060"])
def test_good_device_keys(key: str) -> None:
    text = model_yaml(f'schemes:\n  s:\n    devices: {{"{key}": 1}}\n    command: run\n')
    config = parse_text(text, "t")
    assert config.models["m"].schemes["s"].devices == {key: 1}


def test_empty_device_key() -> None:
    p = only_problem(model_yaml('schemes:\n  s:\n    devices: {" ": 1}\n    command: run\n'))
    assert (p.path, p.line) == ("models.m.schemes.s.devices. ", 5)
    assert p.message == "a device key cannot be empty"


def test_negative_mib() -> None:
    p = only_problem(
        model_yaml(
            """\
            schemes:
              gpu:
                devices:
                  cpu: 10
                  "rtx 4060": -1
                command: run
            """
        )
    )
    assert (p.path, p.line) == ("models.m.schemes.gpu.devices.rtx 4060", 7)
    assert "greater than or equal to 0" in p.message


def test_bad_mode() -> None:
    p = only_problem(model_yaml("mode: vision\nschemes:\n  s: {command: run}\n"))
    assert (p.path, p.line) == ("models.m.mode", 3)
    assert "'chat'" in p.message and "'reranker'" in p.message


@pytest.mark.parametrize("mode", ["chat", "base", "embedding", "reranker"])
def test_every_mode_is_accepted(mode: str) -> None:
    config = parse_text(model_yaml(f"mode: {mode}\nschemes:\n  s: {{command: run}}\n"), "t")
    assert config.models["m"].mode == mode


def test_health_path_without_slash() -> None:
    p = only_problem(model_yaml("health_path: health\nschemes:\n  s: {command: run}\n"))
    assert (p.path, p.line) == ("models.m.health_path", 3)
    assert "'/'" in p.message


def test_unknown_key_in_model() -> None:
    p = only_problem(model_yaml("aliasses: [x]\nschemes:\n  s: {command: run}\n"))
    assert (p.path, p.line) == ("models.m.aliasses", 3)
    assert p.message == "unknown key (not part of the configuration); did you mean 'aliases'?"


def test_unknown_top_level_key() -> None:
    p = only_problem("server:\n  port: 1\nmodel:\n  x: 1\n")
    assert (p.path, p.line) == ("model", 3)
    assert "unknown key" in p.message


def test_unknown_key_in_scheme() -> None:
    p = only_problem(model_yaml("schemes:\n  s:\n    command: run\n    enviroment: {}\n"))
    assert (p.path, p.line) == ("models.m.schemes.s.enviroment", 6)


def test_bad_duration_in_server_and_model() -> None:
    found = triples(
        """\
        server:
          idle_timeout: soon
        models:
          m:
            idle_timeout: -5
            schemes:
              s: {command: run}
        """
    )
    assert found == [
        ("server.idle_timeout", 2, "'soon' is not a duration (use 90s, 5m, 1h or seconds)"),
        ("models.m.idle_timeout", 5, "a duration cannot be negative"),
    ]


def test_zero_startup_timeout_is_refused() -> None:
    p = only_problem("server:\n  startup_timeout: 0s\n")
    assert (p.path, p.line) == ("server.startup_timeout", 2)


def test_non_finite_duration_is_refused() -> None:
    p = only_problem("server:\n  idle_timeout: .nan\n")
    assert (p.path, p.line) == ("server.idle_timeout", 2)
    assert "finite" in p.message


@pytest.mark.parametrize(
    ("field", "value"), [("port", 0), ("port", 65536), ("port", "x"), ("max_concurrency", -1)]
)
def test_bad_model_numbers(field: str, value: object) -> None:
    p = only_problem(model_yaml(f"{field}: {value}\nschemes:\n  s: {{command: run}}\n"))
    assert (p.path, p.line) == (f"models.m.{field}", 3)


def test_server_port_out_of_range() -> None:
    p = only_problem("server:\n  host: x\n  port: 70000\n")
    assert (p.path, p.line) == ("server.port", 3)


def test_bad_language() -> None:
    p = only_problem("server:\n  language: fr\n")
    assert (p.path, p.line) == ("server.language", 2)


def test_bad_declared_device() -> None:
    found = triples(
        """\
        devices:
          - {name: ok, memory_total_mib: 1}
          - name: ""
            kind: tpu
            memory_total_mib: -1
        """
    )
    paths = [(path, line) for path, line, _ in found]
    assert paths == [
        ("devices.1.name", 3),
        ("devices.1.kind", 4),
        ("devices.1.memory_total_mib", 5),
    ]


def test_declared_device_needs_memory_total() -> None:
    p = only_problem("devices:\n  - {name: gpu}\n")
    assert (p.path, p.line) == ("devices.0.memory_total_mib", 2)
    assert p.message == "required key is missing"


def test_model_that_is_not_a_mapping() -> None:
    p = only_problem("models:\n  m: just a string\n")
    assert (p.path, p.line) == ("models.m", 2)


def test_alias_of_wrong_type() -> None:
    p = only_problem(model_yaml("aliases: [ok, [nested]]\nschemes:\n  s: {command: run}\n"))
    assert (p.path, p.line) == ("models.m.aliases.1", 3)


def test_key_names_that_look_like_pydantic_tags_stay_in_the_path() -> None:
    # Names such as "stream-llm", "int" or a device key "strix halo" are real YAML keys and
    # must not be mistaken for pydantic's union branch names ("str", "int").
    found = triples(
        """\
        models:
          stream-llm:
            mode: bad
            schemes:
              strix:
                devices: {"strix halo": -1}
                command: run
          int:
            port: x
            schemes:
              s: {command: run}
        """
    )
    assert [(path, line) for path, line, _ in found] == [
        ("models.stream-llm.mode", 3),
        ("models.stream-llm.schemes.strix.devices.strix halo", 6),
        ("models.int.port", 9),
    ]


# --- cross checks ------------------------------------------------------------------------


def test_duplicate_name_and_alias_across_models_ignoring_case() -> None:
    found = triples(
        """\
        models:
          Qwen:
            aliases: [coder]
            schemes:
              s: {command: run}
          other:
            aliases: [QWEN, Coder, fine]
            schemes:
              s: {command: run}
        """
    )
    assert found == [
        ("models.other.aliases.0", 7, "name 'QWEN' is already used by model 'Qwen'"),
        ("models.other.aliases.1", 7, "name 'Coder' is already used by model 'Qwen'"),
    ]


def test_model_name_equal_to_another_models_alias() -> None:
    p = only_problem(
        """\
        models:
          a:
            aliases: [shared]
            schemes:
              s: {command: run}
          Shared:
            schemes:
              s: {command: run}
        """
    )
    assert (p.path, p.line) == ("models.Shared", 6)
    assert "already used by model 'a'" in p.message


def test_duplicate_port() -> None:
    p = only_problem(
        """\
        models:
          a:
            port: 10001
            schemes:
              s: {command: run}
          b:
            port: 10002
            schemes:
              s: {command: run}
          c:
            port: 10001
            schemes:
              s: {command: run}
        """
    )
    assert (p.path, p.line) == ("models.c.port", 11)
    assert p.message == "port 10001 is already used by 'a'"


@pytest.mark.parametrize("where", ["name", "alias"])
def test_reserved_name_all_models(where: str) -> None:
    if where == "name":
        text = "models:\n  all-models:\n    schemes:\n      s: {command: run}\n"
        expected = ("models.all-models", 2)
    else:
        text = (
            "models:\n  m:\n    aliases: [x, all-models]\n    schemes:\n      s: {command: run}\n"
        )
        expected = ("models.m.aliases.1", 3)
    p = only_problem(text)
    assert (p.path, p.line) == expected
    assert "reserved" in p.message


def test_empty_alias() -> None:
    p = only_problem(model_yaml('aliases: ["  "]\nschemes:\n  s: {command: run}\n'))
    assert (p.path, p.line) == ("models.m.aliases.0", 3)
    assert p.message == "a model name or alias cannot be empty"


def test_empty_model_name() -> None:
    p = only_problem('models:\n  "":\n    schemes:\n      s: {command: run}\n')
    assert (p.path, p.line) == ("models.", 2)
    assert "cannot be empty" in p.message


def test_duplicate_yaml_keys() -> None:
    found = triples(
        """\
        server:
          port: 1
          port: 2
        models:
          m:
            schemes:
              s: {command: a}
          m:
            schemes:
              s: {command: b, command: c}
        """
    )
    assert found == [
        ("server.port", 3, "duplicate key"),
        ("models.m", 8, "duplicate key"),
        ("models.m.schemes.s.command", 10, "duplicate key"),
    ]


def test_duplicate_keys_reported_with_other_problems() -> None:
    found = triples("server:\n  port: 1\n  port: 2\n  colour: red\n")
    assert ("server.port", 3, "duplicate key") in found
    assert ("server.colour", 4, "unknown key (not part of the configuration)") in found
    assert len(found) == 2


# --- file-level problems -----------------------------------------------------------------


def test_yaml_syntax_error() -> None:
    p = only_problem("server:\n  port: 1\n  host: [unclosed\nmodels: {}\n")
    assert p.path == ""
    assert p.line == 4
    assert p.message.startswith("YAML syntax error:")


def test_yaml_syntax_error_bad_indentation() -> None:
    p = only_problem("models:\n  m:\n    mode: chat\n   bad: 1\n")
    assert p.path == ""
    assert p.line == 4
    assert "YAML syntax error" in p.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_file_that_is_not_a_mapping(text: str) -> None:
    p = only_problem(text)
    assert (p.path, p.line) == ("", 1)
    assert p.message == "the file must hold a mapping"
    assert str(p) == "<root> (line 1): the file must hold a mapping"


def test_self_referencing_yaml_alias_is_a_problem_not_a_crash() -> None:
    p = only_problem("a: &x [*x]\n")
    assert (p.path, p.line) == ("a", 1)


def test_yaml_anchors_are_followed() -> None:
    config = parse_text(
        textwrap.dedent(
            """\
            models:
              a:
                schemes: &s
                  cpu: {command: run, devices: {cpu: 100}}
              b:
                schemes: *s
            """
        ),
        "t",
    )
    assert config.models["b"].schemes["cpu"].devices == {"cpu": 100}


# --- many problems at once ---------------------------------------------------------------

BROKEN = """\
server:
  port: 99999
  idle_timeout: often
models:
  qwen:
    aliases: [coder]
    mode: vision
    port: 10001
    health_path: health
    schemes:
      gpu:
        devices: {"cuda:x": 100, "rtx 4060": -5}
        command: run
        script: run.sh
      cpu:
        devices: {cpu: 100}
  coder:
    port: 10001
    colour: blue
  all-models:
    schemes:
      s: {command: run}
"""


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    found = triples(BROKEN)
    paths = {(path, line) for path, line, _ in found}
    expected = {
        ("server.port", 2),
        ("server.idle_timeout", 3),
        ("models.qwen.mode", 7),
        ("models.qwen.health_path", 9),
        ("models.qwen.schemes.gpu.devices.rtx 4060", 12),
        ("models.qwen.schemes.gpu", 11),
        ("models.qwen.schemes.cpu", 15),
        ("models.coder", 17),  # duplicate of qwen's alias
        ("models.coder.port", 18),  # duplicate port
        ("models.coder.colour", 19),
        ("models.coder.schemes", 17),  # missing
        ("models.all-models", 20),  # reserved
    }
    assert expected <= paths, expected - paths
    # the bad cuda:x key is reported too, next to the bad size in the same mapping
    assert any("cuda:N" in message and line == 12 for _, line, message in found)
    assert len(found) == len(expected) + 1
    # sorted by line, so a user reads them top to bottom
    lines = [line or 0 for _, line, _ in found]
    assert lines == sorted(lines)


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(BROKEN, "broken.yaml")
    text = str(info.value)
    assert text.startswith(f"invalid configuration broken.yaml: {len(info.value.problems)}")
    assert "models.qwen.health_path (line 9): health_path must start with '/'" in text
    assert text.count("\n  - ") == len(info.value.problems)


def test_problem_str_without_line() -> None:
    assert str(ConfigProblem("a.b", None, "bad")) == "a.b: bad"
    assert str(ConfigProblem("a.b", 3, "bad")) == "a.b (line 3): bad"


# --- files and schema --------------------------------------------------------------------


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "llm.yaml"
    path.parent.mkdir()
    path.write_text(VALID, encoding="utf-8")
    loaded = load_file(path)
    assert loaded.source == str(path)
    assert loaded.base_dir == path.parent.resolve()
    assert "Qwen3-Coder" in loaded.config.models


def test_load_file_reports_problems_with_the_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.source == str(path)
    assert [(p.path, p.line) for p in info.value.problems] == [("models.m.schemes", 2)]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_file(path)
    [p] = info.value.problems
    assert p.line is None
    assert p.message.startswith("cannot read file")


def test_load_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"server:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.problems[0].message.startswith("cannot read file")


def test_json_schema_is_valid_json_describing_the_config() -> None:
    schema = json.loads(json_schema())
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"server", "devices", "models", "cluster", "store"}
    assert schema.get("additionalProperties") is False
    defs = schema["$defs"]
    assert {"ServerConfig", "ModelConfig", "SchemeConfig", "DeviceConfig"} <= set(defs)
    assert "schemes" in defs["ModelConfig"]["required"]
    assert defs["ModelConfig"]["properties"]["mode"]["enum"] == [
        "chat",
        "base",
        "embedding",
        "reranker",
    ]


def test_cross_entry_problems_model_port_on_server_port_devices_and_reserved_name() -> None:
    text = (
        "server: {port: 9000}\n"
        "devices:\n"
        "  - {name: GPU A, memory_total_mib: 10}\n"
        "  - {name: gpu a, memory_total_mib: 10}\n"
        "models:\n"
        "  m: {port: 9000, aliases: [All-Models], schemes: {s: {command: x}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_text(text, "t")
    found = {(p.path, p.line, p.message) for p in info.value.problems}
    assert found == {
        ("devices.1.name", 4, "device 'gpu a' is declared twice"),
        ("models.m.port", 6, "port 9000 is already used by the server itself (server.port)"),
        ("models.m.aliases.0", 6, "'all-models' is reserved by the API"),
    }

"""Value types validate at construction; configuration errors name the key."""

from __future__ import annotations

import pytest
from rocmux.config import Config
from rocmux.errors import ConfigError, InvalidModel, ModelNotFound
from rocmux.models import check_gguf
from rocmux.types import Availability, GenerateConfig, LoadConfig, Message


def test_load_config_validates():
    with pytest.raises(ValueError, match="context_len"):
        LoadConfig(context_len=0)
    with pytest.raises(ValueError, match="gpu_layers"):
        LoadConfig(gpu_layers=-1)
    assert LoadConfig(extra_flags="--metrics").extra_flags == ("--metrics",)
    assert LoadConfig(devices=["0", "1"]).devices == ("0", "1")


def test_generate_config_validates_and_maps_to_openai():
    with pytest.raises(ValueError):
        GenerateConfig(temperature=-1)
    with pytest.raises(ValueError):
        GenerateConfig(top_p=1.5)
    with pytest.raises(ValueError):
        GenerateConfig(max_tokens=0)
    body = GenerateConfig(max_tokens=5, temperature=0, seed=1, stop="\n", top_k=40).to_openai()
    assert body == {"max_tokens": 5, "temperature": 0, "seed": 1, "stop": ["\n"], "top_k": 40}


def test_ignore_eos_is_sent_only_when_asked():
    assert "ignore_eos" not in GenerateConfig().to_openai()
    assert GenerateConfig(max_tokens=3, ignore_eos=True).to_openai() == {
        "max_tokens": 3,
        "ignore_eos": True,
    }


def test_message_role_is_checked():
    with pytest.raises(ValueError):
        Message("robot", "hi")  # type: ignore[arg-type]
    assert Message("user", "hi").to_openai() == {"role": "user", "content": "hi"}


def test_availability_unavailable():
    a = Availability.unavailable("no GPU")
    assert not a.ok and a.reason == "no GPU" and a.priority == 0


def test_config_from_toml(tmp_path):
    path = tmp_path / "rocmux.toml"
    path.write_text(
        'backend = "llamacpp_hip"\nmodel = "~/m.gguf"\n[load]\ncontext_len = 8192\n'
        '[generate]\ntemperature = 0.2\n[backends.llamacpp_hip]\nserver = "/opt/ls"\n'
    )
    config = Config.from_toml(path)
    assert config.backend == "llamacpp_hip"
    assert config.load.context_len == 8192
    assert config.generate.temperature == 0.2
    assert config.backend_options("llamacpp_hip")["server"] == "/opt/ls"
    assert config.model is not None and "~" not in str(config.model)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bakend = 'x'\n", "unknown key 'bakend'"),
        ("[load]\ncontext = 5\n", "unknown key load.context"),
        ("[load]\ncontext_len = -5\n", "bad value in load"),
        ("backend = 3\n", "'backend' .* must be a string"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    path = tmp_path / "rocmux.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        Config.from_toml(path)


def test_gguf_header_checks(tmp_path, tiny_model):
    assert check_gguf(tiny_model) == tiny_model.resolve()
    with pytest.raises(ModelNotFound):
        check_gguf(tmp_path / "missing.gguf")
    with pytest.raises(InvalidModel, match="directory"):
        check_gguf(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModel, match="not a GGUF"):
        check_gguf(empty)
    absurd = tmp_path / "absurd.gguf"
    absurd.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") * 2)
    with pytest.raises(InvalidModel, match="corrupt GGUF header"):
        check_gguf(absurd)
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(InvalidModel, match="version 9"):
        check_gguf(v9)

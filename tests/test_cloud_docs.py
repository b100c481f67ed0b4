"""The README's and the example config's Tencent and Alibaba examples are complete and valid."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from hapsms_relay import config
from hapsms_relay.providers.aliyun import AliyunProvider
from hapsms_relay.providers.tencent import TencentProvider

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = "您的验证码是123456，感谢您的使用！"
HEAD = '[server]\nlisten = "127.0.0.1:0"\ntokens = ["t"]\n[routes]\nsms = ["{name}"]\n'


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tencent-secret-id", "tencent-secret-key", "aliyun-access-key-id",
                 "aliyun-access-key-secret", "webhook-token"):
        (tmp_path / name).write_text("x-" + name)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))


def check(doc: str, name: str) -> None:
    cfg = config.parse(tomllib.loads(HEAD.format(name=name) + doc))
    provider = cfg.providers[name]
    assert isinstance(provider, TencentProvider | AliyunProvider)
    assert provider.supports_voice
    found = provider.templates.match(SAMPLE)
    assert found is not None and found.params.values == ("123456",)


@pytest.mark.parametrize("name", ["tencent", "aliyun"])
def test_readme_example_loads(name: str, credentials: None) -> None:
    """The README's config example for the provider loads and maps HAP's sample text."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if f'type = "{name}"' in b]
    assert len(blocks) == 1
    check(blocks[0], name)


@pytest.mark.parametrize("name", ["tencent", "aliyun"])
def test_example_config_block_loads(name: str, credentials: None) -> None:
    """The commented block in systemd/config.example.toml loads once uncommented."""
    text = (ROOT / "systemd/config.example.toml").read_text()
    m = re.search(rf'^# \[\[providers\]\]\n# name = "{name}"\n(?:#.*\n)+', text, re.M)
    assert m is not None
    block = "\n".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in m.group(0).splitlines())
    check(block, name)

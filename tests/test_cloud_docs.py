"""The docs' and the example config's Tencent and Alibaba examples are complete and valid."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from hapsms_relay import config
from hapsms_relay.providers.aliyun import AliyunProvider
from hapsms_relay.providers.tencent import TencentProvider
from tests import docs

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = "您的验证码是123456，感谢您的使用！"
INTL_SAMPLE = "Your verification code is 123456"
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
    found = provider.templates.match(SAMPLE, "CN")
    assert found is not None and found.params.values == ("123456",)


def blocks_with(name: str) -> list[str]:
    """The toml blocks of docs/providers/ that configure a provider of this type."""
    pages = sorted((docs.DOCS / "providers").glob("*.md"))
    return [b for p in pages for b in docs.toml_blocks(p.read_text()) if f'type = "{name}"' in b]


@pytest.mark.parametrize("name", ["tencent", "aliyun"])
def test_docs_example_loads(name: str, credentials: None) -> None:
    """The provider page's config example loads and maps HAP's sample text, for
    mainland numbers and, with its international mapping, for others."""
    (block,) = [b for b in blocks_with(name) if "[server]" not in b]
    check(block, name)
    cfg = config.parse(tomllib.loads(HEAD.format(name=name) + block))
    provider = cfg.providers[name]
    assert isinstance(provider, TencentProvider | AliyunProvider)
    assert provider.templates.match(INTL_SAMPLE, "HK") is not None


def test_docs_mainland_and_international_example(
    credentials: None, tmp_path: Path
) -> None:
    """The complete mainland + international example loads, and each provider has a way to
    carry both a mainland and a Hong Kong number, the text of a voice code included."""
    for extra in ("aliyun-intl-access-key-id", "aliyun-intl-access-key-secret"):
        (tmp_path / extra).write_text("x-" + extra)
    (block,) = [b for b in blocks_with("tencent") if "[server]" in b]
    cfg = config.parse(tomllib.loads(block))
    tencent, aliyun = cfg.providers["tencent"], cfg.providers["aliyun"]
    assert isinstance(tencent, TencentProvider) and isinstance(aliyun, AliyunProvider)
    fallback = cfg.routes.voice_fallback_text.format(code="123456")
    for region in ("CN", "HK"):
        assert tencent.templates.match(fallback, region) is not None
    assert aliyun.templates.match(fallback, "CN") is not None
    assert aliyun.international_api == "SendMessageToGlobe"
    assert tencent.sign_name and aliyun.sign_name


@pytest.mark.parametrize("name", ["tencent", "aliyun"])
def test_example_config_block_loads(name: str, credentials: None) -> None:
    """The commented block in systemd/config.example.toml loads once uncommented."""
    text = (ROOT / "systemd/config.example.toml").read_text()
    m = re.search(rf'^# \[\[providers\]\]\n# name = "{name}"\n(?:#.*\n)+', text, re.M)
    assert m is not None
    block = "\n".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in m.group(0).splitlines())
    check(block, name)

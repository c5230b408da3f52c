"""kdlab.network: one rule for "offline" and one reachability probe, for hub models, hub datasets and W&B."""
import pytest

from kdlab import network

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in OFFLINE_VARS + network.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var", OFFLINE_VARS)
@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                            ("0", False), ("", False), ("false", False)])
def test_every_offline_switch_is_read_as_huggingface_hub_reads_it(clean_env, var, value, offline):
    clean_env.setenv(var, value)
    assert network.offline() is offline


def test_a_closed_port_is_unreachable_and_a_proxy_passes(clean_env):
    assert network.reachable("http://127.0.0.1:9", timeout=1.0) is False     # discard port: nothing listens
    assert network.reachable("127.0.0.1:9", timeout=1.0) is False            # a bare host[:port]
    clean_env.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert network.reachable("http://127.0.0.1:9", timeout=1.0) is True      # behind a proxy the probe proves nothing


@pytest.mark.parametrize("var", OFFLINE_VARS)
def test_any_offline_switch_makes_an_uncached_hub_model_fail_without_probing(clean_env, var):
    from omegaconf import OmegaConf

    from kdlab.modeling import ModelUnavailable, resolve_folder

    clean_env.setenv(var, "1")
    clean_env.setattr(network, "reachable", lambda url, timeout: pytest.fail("probed while offline"))
    spec = OmegaConf.create({"name": "gpt2-base", "hub_id": "MiniLLM/init-gpt2-120M", "path": None, "package": None,
                             "random": None, "gguf_file": None, "revision": None})
    with pytest.raises(ModelUnavailable, match="unreachable"):
        resolve_folder(spec, "student")

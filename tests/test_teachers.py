"""The teacher interface (kdlab/teacher/): the method x teacher table, declared once by the methods, shown in
the README and enforced before anything loads; the live teacher's answers; no module outside kdlab/teacher/
and the method files decides which kind of teacher a job has."""
import re

import pytest
import torch

from conftest import ROOT
from kdlab.cli import validate_config
from kdlab.config import ConfigError
from kdlab.methods import CONF_DIR, method_class
from kdlab.teacher import capability_table, kind_class, teacher_kind

METHODS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
KINDS = {"live": [], "cached": ["teacher.cache=/nowhere/cache"], "served": ["teacher.serve.url=http://127.0.0.1:9"]}


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", ["teacher=tiny", "student=tiny", *overrides])


def table_cells() -> dict[tuple[str, str, bool], str]:
    """``(method, kind, across tokenizers) -> cell`` read back from the README's table."""
    readme = (ROOT / "README.md").read_text()
    header = ("| method | live | cached | served | live, across tokenizers | cached, across tokenizers | "
              "served, across tokenizers |")
    assert header in readme
    cells = {}
    for line in readme.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        name, *row = [c.strip() for c in line.strip("|").split("|")]
        for (cross, kind), cell in zip([(c, k) for c in (False, True) for k in KINDS], row):
            cells[name.strip("`"), kind, cross] = cell
    return cells


def test_the_readme_table_is_the_methods_declarations():
    table = capability_table({name: method_class(name) for name in METHODS})
    assert table in (ROOT / "README.md").read_text()
    assert {m for m, _, _ in table_cells()} == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cross", [False, True], ids=["same-tokenizer", "across-tokenizers"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_cell_works_or_is_refused_in_one_line(method, kind, cross):
    """A cell that says yes passes the config check; one that says no is refused before anything loads, in one
    line naming the method, the teacher kind (or the tokenizers) and the way out."""
    cell = table_cells()[method, kind, cross]
    tokenizer = ["student=tiny-bytes", "divergence=uld"] if cross else []
    cfg = compose(f"method={method}", *tokenizer, *KINDS[kind])
    assert teacher_kind(cfg.teacher) == kind
    if cell == "yes":
        validate_config(cfg)
        return
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    line = str(refused.value)
    assert "\n" not in line and f"method={method}" in line
    if cell == "no: not across tokenizers":
        assert "cannot distil across tokenizers" in line and "use method=kd" in line
    else:
        assert f"cannot train with a {kind} teacher" in line and "use a live teacher" in line
        capability = cell.removeprefix("no: ")
        assert capability not in kind_class(kind).provides and capability in kind_class("live").provides


def test_a_divergence_that_needs_every_logit_is_refused_with_a_top_k_teacher():
    for kind in ("cached", "served"):
        with pytest.raises(ConfigError, match=f"divergence=akl needs the teacher's full distribution, which a {kind} "
                                              f"teacher .* gives only as its top-k"):
            validate_config(compose("method=kd", "divergence=akl", *KINDS[kind]))
    validate_config(compose("method=kd", "divergence=akl"))


def test_cache_and_server_together_and_a_served_finetune_are_refused():
    with pytest.raises(ConfigError, match="both stand in for the teacher"):
        validate_config(compose(*KINDS["cached"], *KINDS["served"]))
    with pytest.raises(ConfigError, match="teacher.finetune fine-tunes the teacher in this process"):
        validate_config(compose("teacher=smollm2-135m", "student=smollm2-6l", *KINDS["served"]))
    with pytest.raises(ConfigError, match=r"teacher.serve.url=localhost:8000 is not an http\(s\) URL"):
        validate_config(compose("teacher.serve.url=localhost:8000"))
    with pytest.raises(ConfigError, match="teacher.serve.api_key_env=KDLAB_NO_SUCH_KEY: that environment variable"):
        validate_config(compose(*KINDS["served"], "teacher.serve.api_key_env=KDLAB_NO_SUCH_KEY"))


def test_the_live_teacher_gives_logits_top_k_with_tail_and_token_logprobs():
    from test_teacher_cache import V, reference_log_probs, synthetic_items, tiny_teacher
    from kdlab.data import collate
    from kdlab.modeling import byte_tokenizer
    from kdlab.teacher.interface import LiveTeacher

    tok = byte_tokenizer()
    model, items = tiny_teacher(), synthetic_items(tok)[:3]
    batch = collate(items, tok.pad_token_id)
    live, ref = LiveTeacher(model, V), reference_log_probs(model, items)
    assert torch.allclose(live.logits(batch).log_softmax(-1), ref, atol=1e-5)
    assert torch.allclose(live.token_logprobs(batch), ref.gather(1, batch.labels[batch.response_mask][:, None])[:, 0],
                          atol=1e-5)
    top = live.topk(batch, 5)
    kept = ref.topk(5, dim=-1).values
    assert torch.allclose(top.values, kept - kept.logsumexp(-1, keepdim=True), atol=1e-5)
    assert torch.allclose(top.tail.exp(), 1 - kept.exp().sum(-1), atol=1e-5)


def test_only_the_teacher_package_and_the_methods_decide_the_teacher_kind():
    """Acceptance: ``teacher.cache`` / ``teacher.serve`` / the kind are read nowhere else in kdlab."""
    pattern = re.compile(r"\.teacher\.(cache|serve)\b|teacher\.get\([\"'](cache|serve)|teacher_kind\(|\.kind ==|"
                         r"(Live|Cached|Served)Teacher\b|TeacherCache\b")
    offenders = []
    for path in (ROOT / "kdlab").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("kdlab/teacher/", "kdlab/methods/")):
            continue
        code = "\n".join(line.split("  #")[0] for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.*?)"""', "", code, flags=re.S)    # docstrings may mention teacher.cache
        offenders += [f"{rel}: {m.group(0)}" for m in pattern.finditer(code)]
    assert not offenders, offenders

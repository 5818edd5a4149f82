"""What identifies a run, a trial, a cached decode or an lr finding comes from the config's field declarations: an
option added to RunConfig joins every identity its section and role say it should, with no edit elsewhere."""

import dataclasses

from transferlab.config.identity import SECTIONS, fingerprint, identity
from transferlab.config.run import RunConfig, option
from transferlab.engine.lr_find import finding_key
from transferlab.models.registry import resolve
from transferlab.study.identity import trial_identity


def extended(name: str, default, **declared):
    """RunConfig with one more option, declared as any option is (config.run.option)."""
    return dataclasses.make_dataclass("Extended", [(name, type(default), option(default, "a new option", **declared))],
                                      bases=(RunConfig,))  # fmt: skip


def test_a_new_training_option_changes_the_trial_identity():
    Extended = extended("mixup", 0.0, section="augment")
    base = resolve(Extended(weights="none"))
    changed = dataclasses.replace(base, mixup=0.2)
    assert "mixup" in identity(base)
    assert trial_identity({}, changed, "data") != trial_identity({}, base, "data")
    assert finding_key(changed, "data") != finding_key(base, "data")  # the lr range test reads augmentation too


def test_a_new_schedule_option_leaves_the_lr_finding_alone():
    Extended = extended("cooldown", 0, section="schedule")
    base = resolve(Extended(weights="none"))
    changed = dataclasses.replace(base, cooldown=3)
    assert trial_identity({}, changed, "data") != trial_identity({}, base, "data")
    assert finding_key(changed, "data") == finding_key(base, "data")  # the test sets the lr itself


def test_a_new_runtime_option_changes_no_identity():
    Extended = extended("colour_bars", True, section="execution", role="runtime")
    base = resolve(Extended(weights="none"))
    changed = dataclasses.replace(base, colour_bars=False)
    assert "colour_bars" not in identity(base, roles=("result", "record"))
    assert trial_identity({}, changed, "data") == trial_identity({}, base, "data")


def test_every_field_declares_a_section_and_a_role():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("section") in SECTIONS, f.name
        assert f.metadata.get("role", "result") in ("result", "record", "runtime"), f.name


def test_one_fingerprint_of_plain_values():
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})  # key order is no difference
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint({}, length=32)) == 32

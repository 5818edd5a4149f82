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
    Extended = extended("jitter", 0.0, section="augment")
    base = resolve(Extended(weights="none"))
    changed = dataclasses.replace(base, jitter=0.2)
    assert "jitter" in identity(base)
    assert trial_identity({}, changed, "data") != trial_identity({}, base, "data")
    assert finding_key(changed, "data") != finding_key(base, "data")  # the lr range test reads augmentation too


def test_an_option_added_off_by_default_keeps_the_identities_recorded_before_it():
    Extended = extended("jitter", 0.0, section="augment", added=True)
    before, base = resolve(RunConfig(weights="none")), resolve(Extended(weights="none"))
    assert identity(base) == identity(before)  # at its default: the same trial, the same run folder as before
    assert trial_identity({}, base, "data") == trial_identity({}, before, "data")
    changed = dataclasses.replace(base, jitter=0.2)
    assert identity(changed)["jitter"] == 0.2
    assert trial_identity({}, changed, "data") != trial_identity({}, base, "data")


def test_the_augmentations_added_in_issue_21_join_an_identity_only_when_set():
    base = resolve(RunConfig(weights="none"))
    assert not {"random_resized_crop", "auto_augment", "mixup", "cutmix"} & set(identity(base))
    for name, value in (("random_resized_crop", 0.08), ("auto_augment", "randaugment"), ("mixup", 0.8),
                        ("cutmix", 1.0)):  # fmt: skip
        changed = dataclasses.replace(base, **{name: value})
        assert identity(changed)[name] == value
        assert trial_identity({}, changed, "data") != trial_identity({}, base, "data")


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

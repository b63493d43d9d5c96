"""DiffuASR: the diffusion sampler, which sequences get prefixes, scoring through the prefixes,
training on the tiny synthetic task with two backbones, determinism, persistence, bad parameters."""

import numpy as np
import pytest
import torch

from recforge.errors import ConfigError
from recforge.evaluation.batch import Histories
from recforge.models.registry import create
from recforge.models.sequential.diffuasr import prepend_rows
from seq_contract import assert_beats_popularity, assert_round_trip, assert_scores, markov_data, ndcg

BACKBONE = dict(batch_size=32, lr=0.005, epochs=5, patience=100, max_len=20)
# a small denoiser (4 x 4 embedding square, two levels) and a short stage 1 keep the file fast
FAST = dict(verbose=False, threads=1, n_aug=3, aug_threshold=10, hidden=16, unet_channels=8, unet_mult=[1, 2],
            unet_blocks=1, diff_epochs=15, diff_batch_size=64)


@pytest.fixture(scope="module")
def data():
    return markov_data()


@pytest.fixture(scope="module")
def fitted(data):
    split, valid, _ = data
    return {b: create("diffuasr", **FAST, backbone=b, backbone_params=BACKBONE).fit(split, valid)
            for b in ("sasrec", "gru4rec")}


def train_lengths(split):
    indptr, _ = split.train_sequences
    return np.diff(indptr)


# ---- prefixes ---------------------------------------------------------------------------------
def test_prepend_rows_keeps_the_real_items():
    indptr = np.array([0, 2, 2, 5])
    items = np.array([1, 2, 3, 4, 5])
    prefix = np.array([[7, 8], [9, 9], [0, 0]])  # the last row gets none
    ptr, out, is_prefix = prepend_rows(indptr, items, prefix)
    assert ptr.tolist() == [0, 4, 6, 9]
    assert out.tolist() == [7, 8, 1, 2, 9, 9, 3, 4, 5]
    assert is_prefix.tolist() == [True, True, False, False, True, True, False, False, False]


def test_only_short_sequences_get_prefixes(data, fitted):
    split, _, _ = data
    m = fitted["sasrec"]
    lengths = train_lengths(split)
    short = (lengths >= 1) & (lengths < FAST["aug_threshold"])
    assert short.any() and (~short).any()
    assert np.array_equal(m.prefix_[:, 0] > 0, short)
    assert np.all(m.prefix_[~short] == 0) and np.all(m.prefix_[short] > 0)
    stats = m.protocol_notes()["augmentation"]
    assert stats["augmented_sequences"] == int(short.sum()) and stats["n_aug"] == 3
    assert stats["aug_threshold"] == FAST["aug_threshold"]


def test_backbone_trained_on_prefix_then_the_real_items(data, fitted):
    split, _, _ = data
    m = fitted["sasrec"]
    b = m.backbone_
    indptr, items = split.train_sequences
    # the samples the backbone was built from in fit (private, kept until the model is saved)
    width = b.max_len + 1
    for row, u in enumerate(b._sample_user):
        real = items[indptr[u] : indptr[u + 1]].tolist()
        expected = (m.prefix_[u].tolist() if m.prefix_[u, 0] else []) + real
        sample = b._samples[row]
        assert sample[sample > 0].tolist() == expected[-width:]


def test_generated_items_are_valid(fitted, data):
    split, _, _ = data
    for m in fitted.values():
        p = m.prefix_[m.prefix_[:, 0] > 0]
        assert p.shape[1] == 3 and p.min() >= 1 and p.max() <= split.n_items


def test_sampler_shapes_and_determinism(data, fitted):
    split, _, _ = data
    m = fitted["sasrec"]
    indptr, items = split.train_sequences
    starts, ends = indptr[:-1][:50], indptr[1:][:50]
    a = m.generate(starts, ends, items, seed=3)
    assert a.shape == (50, 3) and a.min() >= 1 and a.max() <= split.n_items
    assert np.array_equal(a, m.generate(starts, ends, items, seed=3))
    assert not np.array_equal(a, m.generate(starts, ends, items, seed=4))
    assert m.generate(starts[:0], ends[:0], items).shape == (0, 3)
    # the stored prefixes are the sampler's output for the training sequences under the model's seed
    users = np.flatnonzero(m.prefix_[:, 0] > 0)
    assert np.array_equal(m.generate(indptr[users], indptr[users + 1], items), m.prefix_[users])


# ---- scoring ----------------------------------------------------------------------------------
def augmented_user(m):
    return int(np.flatnonzero(m.prefix_[:, 0] > 0)[0])


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_causality(fitted, backbone):
    m = fitted[backbone]
    u = augmented_user(m)
    b = m.backbone_
    base = [5, 6, 7, 8, 9, 10]
    changed = base[:3] + [40, 41, 42]  # the future of position 2 of the history
    with torch.no_grad():
        seqs = [b.score_input(m.augment_histories(Histories.from_lists([u], [h], m.n_items_))) for h in (base, changed)]
        out = [b.encode(s) for s in seqs]
    k = b.max_len - 3  # the first changed column (left padding): everything before it is the same
    assert torch.equal(seqs[0][:, :k], seqs[1][:, :k])
    assert torch.allclose(out[0][:, :k], out[1][:, :k], atol=1e-6)
    assert not torch.allclose(out[0][:, k:], out[1][:, k:])


def test_padding_and_batch_do_not_matter(data, fitted):
    _, _, test = data
    m = fitted["sasrec"]
    hist = test.histories.slice(0, 40)
    with torch.no_grad():
        both = m.score(hist)
        for r in (0, 7, 39):
            alone = m.score(hist.slice(r, r + 1))
            assert torch.allclose(both[r], alone[0], atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_score_shapes_empty_history_and_unknown_users(fitted, backbone):
    m = fitted[backbone]
    u = augmented_user(m)
    users, lists = [-1, -1, u, u, 10**6], [[1, 2, 3], [], [], [4, 5], [4, 5]]
    s = assert_scores(m, users, lists, m.n_items_)
    aug = m.augment_histories(Histories.from_lists(users, lists, m.n_items_))
    assert aug.lengths.tolist() == [3, 0, 3, 5, 2]  # prefixes only for the known augmented user
    assert aug.items[aug.indptr[3] : aug.indptr[4]].tolist() == m.prefix_[u].tolist() + [4, 5]
    with torch.no_grad():  # unknown users (-1 or beyond the training users) are scored on their history alone
        assert torch.allclose(s[4], m.backbone_.score(Histories.from_lists([-1], [[4, 5]], m.n_items_))[0], atol=1e-5)
        assert not torch.allclose(s[3], s[4], atol=1e-3)


def test_recommend_excludes_only_the_real_history(fitted):
    m = fitted["sasrec"]
    u = augmented_user(m)
    idx, _ = m.recommend(Histories.from_lists([u], [[3, 7, 9]], m.n_items_), k=5)
    assert idx.shape == (1, 5) and not set(idx[0]) & {0, 3, 7, 9}


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_beats_popularity(data, fitted, backbone):
    assert_beats_popularity(fitted[backbone], data)


def test_validation_and_history(fitted):
    m = fitted["sasrec"]
    h = m.history_
    assert len(h["epochs"]) == BACKBONE["epochs"] and h["best_epoch"] >= 1
    assert all(np.isfinite(e["ndcg@10"]) for e in h["epochs"])
    assert h["diffusion"]["epochs"] == FAST["diff_epochs"] and np.isfinite(h["diffusion"]["final_loss"])
    assert not hasattr(m.backbone_, "validate")  # the validation hook is removed after training


def test_deterministic_by_seed(data):
    split, valid, test = data
    kw = FAST | dict(diff_epochs=3, backbone_params=BACKBONE | dict(epochs=1))
    a = create("diffuasr", **kw, seed=7).fit(split, valid)
    b = create("diffuasr", **kw, seed=7).fit(split, valid)
    c = create("diffuasr", **kw, seed=8).fit(split, valid)
    assert np.array_equal(a.prefix_, b.prefix_) and not np.array_equal(a.prefix_, c.prefix_)
    hist = test.histories.slice(0, 20)
    with torch.no_grad():
        assert torch.equal(a.score(hist), b.score(hist))
    assert ndcg(a, test) == ndcg(b, test)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_save_load_round_trip(data, fitted, backbone, tmp_path):
    m = fitted[backbone]
    back = assert_round_trip(m, data[2], tmp_path / backbone)
    assert np.array_equal(back.prefix_, m.prefix_) and back.backbone_.name == backbone
    indptr, items = data[0].train_sequences
    assert np.array_equal(back.generate(indptr[:-1][:10], indptr[1:][:10], items),
                          m.generate(indptr[:-1][:10], indptr[1:][:10], items))


def test_protocol_notes_and_params(fitted):
    for name, m in fitted.items():
        notes = m.protocol_notes()
        assert notes["backbone"] == name and notes["subsequence_split"] == "none" and notes["loss"] == "ce"
        assert notes["augmentation"]["training_sequences"] >= notes["augmentation"]["augmented_sequences"] > 0
    assert fitted["sasrec"].max_len == BACKBONE["max_len"]


@pytest.mark.parametrize("params,match", [
    (dict(n_aug=0), "n_aug"),
    (dict(aug_threshold=1), "aug_threshold"),
    (dict(hidden=10), "hidden"),
    (dict(hidden=16, unet_mult=[1, 2, 2, 2]), "unet_mult"),
    (dict(sample_steps=2000), "sample_steps"),
    (dict(beta_schedule="quad"), "beta_schedule"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(p_uncond=1.0), "p_uncond"),
    (dict(diff_lr=0.0), "diff_lr"),
    (dict(backbone="pop"), "backbone"),
    (dict(backbone="nosuchmodel"), "nosuchmodel"),
    (dict(backbone_params={"seed": 3}), "seed"),
    (dict(backbone_params={"widht": 3}), "widht"),
    (dict(backbone="cl4srec", backbone_params={"augment": "ticoserec"}), "timestamps"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ConfigError, match=match):
        create("diffuasr", **params)


def test_too_long_prefix_for_the_data(data):
    split, valid, _ = data
    with pytest.raises(ConfigError, match="lower n_aug"):
        create("diffuasr", **(FAST | dict(n_aug=500))).fit(split, valid)


def test_prefix_fills_per_item_fields(fitted):
    m = fitted["sasrec"]
    u = augmented_user(m)
    hist = Histories.from_lists([u, -1], [[4, 5], [6]], m.n_items_, behaviors=[["buy", "view"], ["view"]])
    aug = m.augment_histories(hist)
    assert aug.behaviors.tolist() == [None] * 3 + ["buy", "view", "view"]
    assert aug.items.tolist() == m.prefix_[u].tolist() + [4, 5, 6]


# ---- checkpoints --------------------------------------------------------------------------------
RESUMABLE = FAST | dict(diff_epochs=4, backbone_params=BACKBONE | dict(epochs=2))


def test_run_stopped_in_stage_one_resumes_to_the_same_model(data, tmp_path, monkeypatch):
    from recforge.models.sequential import diffuasr as mod

    split, valid, test = data
    whole = create("diffuasr", **RESUMABLE, seed=3)
    whole.checkpoint_dir = tmp_path / "whole"
    whole.fit(split, valid)

    save = mod.DiffuASR._save_stage1

    def stop_after_epoch_two(self, blob, name):
        save(self, blob, name)
        if blob["epoch"] == 2:
            raise KeyboardInterrupt  # the run is killed right after its second stage-1 epoch

    stopped = create("diffuasr", **RESUMABLE, seed=3)
    stopped.checkpoint_dir = tmp_path / "a"
    monkeypatch.setattr(mod.DiffuASR, "_save_stage1", stop_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(split, valid)
    monkeypatch.setattr(mod.DiffuASR, "_save_stage1", save)
    assert not (tmp_path / "a" / "diffusion.pt").exists()

    again = create("diffuasr", **RESUMABLE, seed=3)
    again.checkpoint_dir, again.resume_from = tmp_path / "b", tmp_path / "a" / "last.pt"
    again.fit(split, valid)
    assert again.history_["diffusion"]["epochs"] == 4
    assert np.array_equal(again.prefix_, whole.prefix_)
    for k, v in whole.diffusion_.state_dict().items():
        assert torch.equal(v, again.diffusion_.state_dict()[k]), k
    assert ndcg(again, test) == ndcg(whole, test)
    assert (tmp_path / "b" / "diffusion.pt").is_file()


def test_run_stopped_in_stage_two_reuses_the_denoiser(data, tmp_path, monkeypatch):
    from recforge.models.sequential import diffuasr as mod

    split, valid, test = data
    first = create("diffuasr", **RESUMABLE, seed=4)
    first.checkpoint_dir = tmp_path / "a"
    first.fit(split, valid)
    blob = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert blob["model"] == "sasrec"  # the backbone's trainer wrote over stage 1's checkpoint

    def no_stage_one(*args, **kwargs):
        raise AssertionError("stage 1 trained again although diffusion.pt was there")

    monkeypatch.setattr(mod.DiffuASR, "_train_diffusion", no_stage_one)
    again = create("diffuasr", **RESUMABLE, seed=4)
    again.checkpoint_dir, again.resume_from = tmp_path / "b", tmp_path / "a" / "last.pt"
    again.fit(split, valid)
    assert np.array_equal(again.prefix_, first.prefix_)
    assert ndcg(again, test) == ndcg(first, test)

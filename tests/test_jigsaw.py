"Tests of kt_paper.jigsaw and kt_paper.pretext: permutation sets, puzzle sampling and assembly, datasets, CFN teachers, one training step."
import dataclasses, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
warnings.filterwarnings('ignore', category=FutureWarning)
from kt_paper.jigsaw import *
from kt_paper.pretext import *
from kt_paper.permutations import *
from kt_paper.jigsaw import _colour_normalise
from kt_paper.nets import cut_at, build_cfn, JigsawNet, JigsawHead
from kt_paper.train import checkpoint_state
from kt_paper.core import load_json

PAPER, TINY, TEST = (JIGSAW_PRESETS[k] for k in ('paper', 'tiny', 'test'))

@pytest.fixture(scope='module')
def p701(): return make_permutations(701, min_dist=3, seed=0)

def photos(n=5, size=120, seed=0):
    "Smooth random colour images, different from each other (HWC uint8)."
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((size, size + 7), Image.BILINEAR)))
    return out

# ---- permutation sets

def test_701_set_properties(p701):
    s = hamming_stats(p701)
    assert s['n'] == 701 and len(np.unique(p701, axis=0)) == 701
    assert s['min'] >= 3
    assert abs(s['mean_norm'] - 0.889) < 0.01
    assert not (p701 == np.arange(9)).all(1).any()            # no identity
    assert (np.sort(p701, 1) == np.arange(9)).all()             # rows are permutations

def test_classic_sets_and_determinism():
    p100 = make_permutations(100, seed=0)
    s = hamming_stats(p100)
    assert s['n'] == 100 and s['min'] >= 2 and s['mean_norm'] > 0.88
    np.testing.assert_array_equal(p100, make_permutations(100, seed=0))
    assert not np.array_equal(p100, make_permutations(100, seed=1))
    small = make_permutations(24, min_dist=3)
    assert hamming_stats(small)['min'] >= 3

def test_min_distance_too_strict():
    with pytest.raises(ValueError, match='only'): make_permutations(50, min_dist=9, n=4)

def test_save_load_npy_and_caffe_bin(tmp_path):
    p = make_permutations(30, min_dist=3)
    np.testing.assert_array_equal(load_permutations(save_permutations(p, tmp_path/'p.npy')), p)
    np.concatenate([[30, 9], (p + 1).ravel()]).astype(np.int32).tofile(tmp_path/'p.bin')
    np.testing.assert_array_equal(load_permutations(tmp_path/'p.bin'), p)
    with pytest.raises(FileNotFoundError): load_permutations(tmp_path/'missing.npy')

# ---- sampling and assembly

def grid_tiles(im, c):
    return np.stack([im[:, r*c.cell:r*c.cell + c.tile, q*c.cell:q*c.cell + c.tile] for r in range(c.grid) for q in range(c.grid)])

def test_label_correctness_undo_permutation(p701):
    c = dataclasses.replace(PAPER, jitter=0, chan_jitter=0, colour='none')
    a, b = (prepare_image(x, c) for x in photos(2, 300))
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = sample_puzzles(rng, c, p701, 1)
        x = assemble_puzzle(a, b, p, c, normalise=False)
        perm = p701[p['label'][0]]
        for s in range(9):
            if p['src'][0, s] == 0: np.testing.assert_allclose(x[s], grid_tiles(a, c)[perm[s]] / 255, atol=1e-6)
            else: np.testing.assert_allclose(x[s], grid_tiles(b, c)[p['cell'][0, s]] / 255, atol=1e-6)

def test_occluder_distribution(p701):
    p = sample_puzzles(np.random.default_rng(1), PAPER, p701, 6000)
    freq = np.bincount(p['n_occ'], minlength=3) / 6000
    np.testing.assert_allclose(freq, 1/3, atol=0.03)
    assert (p['src'].sum(1) == p['n_occ']).all()
    for i in range(200):                                        # distinct cells of the other image
        occ = p['cell'][i, p['src'][i] == 1]
        assert len(set(occ)) == len(occ)
    slot_freq = p['src'].mean(0) / p['n_occ'].mean() * 9        # slots uniform
    np.testing.assert_allclose(slot_freq, 1, atol=0.1)
    plain = sample_puzzles(np.random.default_rng(1), dataclasses.replace(PAPER, max_occluders=0), p701, 500)
    assert plain['src'].sum() == 0

def test_one_colour_decision_per_puzzle(p701):
    p = sample_puzzles(np.random.default_rng(2), PAPER, p701, 4000)
    assert (p['colour'] == p['colour'][:, :1]).all()           # occluders included
    assert abs((p['colour'][:, 0] == 1).mean() - 0.7) < 0.03
    assert set(np.unique(p['colour'])) <= {0, 1}
    code = sample_puzzles(np.random.default_rng(2), dataclasses.replace(PAPER, colour='code'), p701, 4000)
    main_modes = code['colour'][code['src'] == 0]
    np.testing.assert_allclose(np.bincount(main_modes, minlength=3) / len(main_modes), [0.25, 0.5, 0.25], atol=0.03)
    mixed = (code['colour'] != code['colour'][:, :1]).any(1)    # the code decides separately for the occluders
    assert mixed.any() and not mixed[code['n_occ'] == 0].any()

def test_gray_puzzles_are_gray_everywhere(p701):
    c = dataclasses.replace(TEST, colour='gray', max_occluders=2)
    ds = PuzzleDataset(photos(4), c, p701)
    for i in range(4):
        x, _, p, _ = ds.puzzle(i, normalise=False)
        assert np.allclose(x[:, 0], x[:, 1]) and np.allclose(x[:, 1], x[:, 2])

def test_torch_and_numpy_builders_agree(p701):
    c = dataclasses.replace(PAPER, colour='code')
    imgs = [prepare_image(x, c) for x in photos(3, 260)]
    p = sample_puzzles(np.random.default_rng(3), c, p701, 6)
    main, other = np.array([0, 1, 2, 0, 1, 2]), np.array([1, 2, 0, 2, 0, 1])
    xb = assemble_puzzles_torch(torch.as_tensor(np.stack(imgs)), torch.as_tensor(main), torch.as_tensor(other), p, c)
    for i in range(6):
        pi = {k: v[i:i+1] for k, v in p.items()}
        np.testing.assert_allclose(xb[i].numpy(), assemble_puzzle(imgs[main[i]], imgs[other[i]], pi, c), atol=0.1)

def test_per_tile_normalisation(p701):
    ds = PuzzleDataset(photos(3, 300), PAPER, p701)
    x = ds[0][0].reshape(9, -1)
    np.testing.assert_allclose(x.mean(1), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(1, unbiased=False), PAPER.tile_scale, rtol=1e-3)
    # bright, nearly flat tiles (a grey sky) are normalised exactly, like a float64 computation
    flat = (250 + np.random.default_rng(0).integers(0, 3, (300, 300, 3))).astype(np.uint8)
    c = dataclasses.replace(PAPER, colour='none')
    ds = PuzzleDataset([flat, flat.copy()], c, p701)
    x, _, p, j = ds.puzzle(0)
    raw = ds.puzzle(0, normalise=False)[0].astype(np.float64).reshape(9, -1)
    ref = (raw - raw.mean(1, keepdims=True)) / (raw.std(1, keepdims=True) + 1e-5) * c.tile_scale
    np.testing.assert_allclose(x.reshape(9, -1), ref, atol=0.05)

# ---- datasets

def test_occluders_never_from_same_image():
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ds = PuzzleDataset(photos(3), TEST, perms)
    for ep in range(30):
        ds.epoch = ep
        assert all(ds.puzzle(i)[3] != i for i in range(3))
    with pytest.raises(ValueError, match='at least 2'): PuzzleDataset(photos(1), TEST, perms)

def test_same_seed_same_batch():
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ims = photos(8)
    def first_batch(workers, seed=0):
        dls = jigsaw_dataloaders(ims, ims[:4], TEST, perms, seed=seed, num_workers=workers)
        return next(iter(dls.train))
    (x0, y0), (x1, y1) = first_batch(0), first_batch(0)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, y2 = first_batch(2)                                    # independent of the number of workers
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x3, _ = first_batch(0, seed=1)
    assert not torch.equal(x0, x3)

def test_bad_image_file_is_named(tmp_path):
    bad = tmp_path/'broken.jpg'; bad.write_bytes(b'not a jpeg')
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ds = PuzzleDataset([bad, bad], TEST, perms)
    from kt_paper.data import ImageReadError   # the one decode error of the project (data.load_rgb), naming the file
    with pytest.raises(ImageReadError, match='broken.jpg'): ds[0]

@pytest.mark.parametrize('preset', list(JIGSAW_PRESETS))
def test_shapes_for_every_preset(preset):
    c = JIGSAW_PRESETS[preset]
    perms = make_permutations(min(c.n_perms, 24), c.min_dist)
    ds = PuzzleDataset(photos(2, max(c.resize, 64)), c, perms)
    x, y = ds[0]
    assert x.shape == (c.n_tiles, 3, c.tile, c.tile) and x.dtype == torch.float32 and 0 <= y < len(perms)
    net = cfn_from_config(c, n_perms=len(perms)).eval()
    with torch.no_grad(): assert net(x[None]).shape == (1, len(perms))

# ---- models

def test_trunks_and_features():
    net = build_cfn('alexnet', 10, width=0.25)
    assert [n for n, _ in net.trunk.named_children()] == ['conv1', 'pool1', 'norm1', 'conv2', 'pool2', 'norm2', 'conv3', 'conv4', 'conv5', 'pool5']
    assert cut_at(net.trunk, 'pool5')(torch.randn(1, 3, 64, 64)).shape == (1, 64, 2, 2)
    assert cut_at(net.trunk, 'conv4')(torch.randn(2, 3, 96, 96)).shape[:2] == (2, 96)
    with pytest.raises(KeyError): cut_at(net.trunk, 'fc7')
    vgg = build_cfn('vgg16', 10, width=0.125, tile=32, bn=True)
    assert [n for n, _ in vgg.trunk.named_children()] == [f'conv{i}' for i in range(1, 6)]
    assert cut_at(vgg.trunk, 'conv3')(torch.randn(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    with pytest.raises(ValueError, match='too small'): build_cfn('alexnet', 10, tile=16)

def test_paper_init_stds():
    net = build_cfn('alexnet', 701)
    assert abs(net.trunk.conv1[0].weight.std().item() - 0.01) < 1e-3
    assert abs(net.head.fc7[0].weight.std().item() - 0.005) < 5e-4

def test_checkpoint_roundtrip(tmp_path):
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    net = cfn_from_config(TEST).eval()
    save_jigsaw_net(net, tmp_path/'m.pth', perms)
    back = load_jigsaw_net(tmp_path/'m.pth').eval()
    x = torch.randn(2, 9, 3, TEST.tile, TEST.tile)
    torch.testing.assert_close(back(x), net(x))
    np.testing.assert_array_equal(load_permutations(perms_path(tmp_path/'m.pth')), perms)

# ---- training

def test_one_batch_training_step_and_resume(tmp_path):
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ims = photos(8)
    c = dataclasses.replace(TEST, bs=4, iterations=2)
    dls = jigsaw_dataloaders(ims, ims[:4], c, perms, num_workers=0)
    net = cfn_from_config(c)
    before = [p.detach().clone() for p in net.parameters()]
    learn = jigsaw_learner(dls, net, c, path=tmp_path, device='cpu')
    train_jigsaw(learn, c, tmp_path/'ck', fingerprint='a')
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    loss, acc = learn.validate()
    assert np.isfinite(loss) and 0 <= acc <= 1
    assert checkpoint_state(tmp_path/'ck')['epoch'] == 1 and (tmp_path/'ck'/'last.pth').exists()
    assert (tmp_path/'ck'/'history.csv').exists()
    # resuming a finished run does no more work and keeps the weights
    after = [p.detach().clone() for p in net.parameters()]
    learn2 = jigsaw_learner(dls, cfn_from_config(c), c, path=tmp_path, device='cpu')
    assert train_jigsaw(learn2, c, tmp_path/'ck', fingerprint='a') == 1
    assert all(torch.equal(a, b) for a, b in zip(after, learn2.model.parameters()))
    learn3 = jigsaw_learner(dls, cfn_from_config(c), c, path=tmp_path, device='cpu')
    assert train_jigsaw(learn3, dataclasses.replace(c, iterations=4), tmp_path/'ck', fingerprint='a') == 1   # resumed
    assert checkpoint_state(tmp_path/'ck')['epoch'] == 2
    learn4 = jigsaw_learner(dls, cfn_from_config(c), c, path=tmp_path, device='cpu')
    assert train_jigsaw(learn4, c, tmp_path/'ck', fingerprint='b') == 0    # made from other inputs: not resumed
    assert checkpoint_state(tmp_path/'ck') == dict(epoch=1, n_epoch=1, fingerprint='b')

def test_pretext_stage_retrains_on_other_inputs(tmp_path, monkeypatch):
    "run_pretext in the same run folder with another configuration retrains; with the same one it resumes (finished)."
    monkeypatch.setenv('IN_TEST', '1')
    a = run_pretext(str(tmp_path), 'test', seed=0, device='cpu')
    b = run_pretext(str(tmp_path), 'test', seed=0, device='cpu')
    c = run_pretext(str(tmp_path), 'test', seed=0, device='cpu', max_occluders=0)
    assert a['resumed_from_epoch'] == 0 and b['resumed_from_epoch'] >= 1 and b['steps_this_run'] == 0
    assert c['resumed_from_epoch'] == 0 and c['steps_this_run'] > 0 and c['fingerprint'] != a['fingerprint']
    assert load_json(tmp_path/'jigsaw'/'metrics.json')['max_occluders'] == 0

def test_device_puzzles_callback_trains(tmp_path):
    "The batched path: crops from `CropDataset`, puzzles built per batch by `DevicePuzzles` (here on the CPU)."
    from fastai.data.core import DataLoaders
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ds = CropDataset(photos(8), TEST, perms)
    dl = torch.utils.data.DataLoader(ds, 4, shuffle=True)
    dls = DataLoaders(dl, torch.utils.data.DataLoader(ds, 4))
    learn = jigsaw_learner(dls, cfn_from_config(TEST), TEST, path=tmp_path, device='cpu')
    from fastai.callback.core import Callback
    seen = []
    class Record(Callback):
        def after_pred(self): seen.append((self.learn.xb[0].shape, self.learn.xb[0].dtype, self.learn.yb[0].max().item()))
    learn.add_cbs([DevicePuzzles(TEST, perms), Record()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert len(seen) == 4                                        # 2 training + 2 validation batches
    for shape, dtype, ymax in seen:
        assert shape == (4, 9, 3, TEST.tile, TEST.tile) and dtype == torch.float32 and ymax < len(perms)

def test_device_decode_feeds_device_puzzles(tmp_path):
    "`BytesDataset` + `DeviceDecode` (here on the CPU) give `DevicePuzzles` the crops the PIL path makes, up to the resampling filter."
    from fastai.data.core import DataLoaders
    from fastai.callback.core import Callback
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    files = []
    for i, a in enumerate(photos(8)):
        Image.fromarray(a).save(tmp_path/f'{i}.jpg', quality=95); files.append(tmp_path/f'{i}.jpg')
    cfg = dataclasses.replace(TEST, preload=False, puzzles_on='device', decode_on='device')
    ds = BytesDataset(files, cfg, perms)
    dls = DataLoaders(torch.utils.data.DataLoader(ds, 4, shuffle=True, collate_fn=collate_bytes),
                      torch.utils.data.DataLoader(ds, 4, collate_fn=collate_bytes))
    learn = jigsaw_learner(dls, cfn_from_config(cfg), cfg, path=tmp_path, device='cpu')
    crops, seen = CropDataset(files, cfg, perms), []
    class Crops(Callback):
        order = -5.5   # between the decode and the puzzles
        def before_batch(self):
            for x, i in zip(self.learn.xb[0], self.learn.yb[0].tolist()):
                seen.append((x.float() - torch.from_numpy(crops.image(i)).float()).abs().mean().item())
    learn.add_cbs([DeviceDecode(cfg), Crops(), DevicePuzzles(cfg, perms)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert len(seen) == 16 and max(seen) < 2, seen             # 8 training + 8 validation images, each close to PIL's crop
    (tmp_path/'3.jpg').write_bytes(b'broken')                  # a file that went bad: the error names it
    with pytest.raises(Exception, match='3.jpg'), learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)

@pytest.mark.parametrize('decode_on', ['loader', 'device'])
def test_pretext_stage_on_the_device_paths(tmp_path, monkeypatch, decode_on):
    "run_pretext with puzzles cut by `DevicePuzzles` (and images decoded by `DeviceDecode`): trains, says so, and is another fingerprint than the loader path."
    monkeypatch.setenv('IN_TEST', '1')
    a = run_pretext(str(tmp_path/'a'), 'test', seed=0, device='cpu')
    b = run_pretext(str(tmp_path/'b'), 'test', seed=0, device='cpu', puzzles_on='device', decode_on=decode_on, preload=decode_on == 'loader')
    assert (a['puzzles_on'], a['decode_on']) == ('loader', 'loader') and (b['puzzles_on'], b['decode_on']) == ('device', decode_on)
    assert b['steps_this_run'] > 0 and np.isfinite(b['heldout_loss']) and b['fingerprint'] != a['fingerprint']
    assert load_jigsaw_net(tmp_path/'b'/'jigsaw'/'jigsaw_cfn.pth') is not None

def test_step_schedule():
    f = jigsaw_schedule(JigsawConfig(), 350_000)["lr"]           # the paper's schedule, as a function of progress
    assert f(0) == 0.01 and f(99_999/350_000) == 0.01
    assert abs(f(100_000/350_000) - 1e-3) < 1e-12 and abs(f(0.99) - 1e-5) < 1e-12

def test_pretext_variant_goes_to_its_own_folder(tmp_path, monkeypatch):
    "A plain-Jigsaw variant trains into `<out>/jigsaw_plain` with no occluders, beside (not over) the main teacher."
    monkeypatch.setenv('IN_TEST', '1')
    m = run_pretext(str(tmp_path), preset='test', seed=0, name='jigsaw_plain', **variant_overrides('jigsaw_plain', 'test'))
    assert m['name'] == 'jigsaw_plain' and m['max_occluders'] == 0
    assert (tmp_path/'jigsaw_plain'/'jigsaw_cfn.pth').exists() and not (tmp_path/'jigsaw').exists()
    assert load_jigsaw_net(tmp_path/'jigsaw_plain'/'jigsaw_cfn.pth') is not None
    assert pretext_variants('auto', 'small') == ('jigsaw_plain',)

def test_device_puzzles_batch_of_one(tmp_path):
    "`DevicePuzzles` on batches of a single image (an epoch's last batch, `bs=1` validation): puzzles without occluders, no error."
    from fastai.data.core import DataLoaders
    from fastai.callback.core import Callback
    perms = make_permutations(TEST.n_perms, TEST.min_dist)
    ds = CropDataset(photos(5), TEST, perms)
    dls = DataLoaders(torch.utils.data.DataLoader(ds, 4, shuffle=True), torch.utils.data.DataLoader(ds, 1))   # 4 + 1; 5 x 1
    learn = jigsaw_learner(dls, cfn_from_config(TEST), TEST, path=tmp_path, device='cpu')
    seen = []
    class Record(Callback):
        def after_pred(self): seen.append((self.training, tuple(self.learn.xb[0].shape), self.learn.yb[0].max().item()))
    learn.add_cbs([DevicePuzzles(TEST, perms), Record()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert sorted(s[:2] for s in seen) == [(False, (1, 9, 3, TEST.tile, TEST.tile))]*5 + [(True, (1, 9, 3, TEST.tile, TEST.tile)),
                                                                                           (True, (4, 9, 3, TEST.tile, TEST.tile))]
    assert all(y < len(perms) for *_, y in seen)

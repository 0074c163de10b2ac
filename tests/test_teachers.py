"Tests of kt_paper.teachers: feature shapes and determinism, streaming extraction, resumption, manifests."
import textwrap
import numpy as np, pytest, torch
from pathlib import Path
from PIL import Image
from kt_paper import teachers as T
from kt_paper.core import load_json

SMALL = dict(arch='alexnet', width=0.125, tile=16, conv1_kernel=3, conv1_stride=1, conv1_pad=1)
CFG = T.TeacherConfig(image_size=48, hog_size=32, hog_cell=8, batch_size=4, dtype='float32')

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp('imgs'); rng = np.random.default_rng(0); paths = []
    for i in range(11):
        p = d/f'c{i % 3}'/f'{i:02d}.png'; p.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((40 + i, 56, 3)) * 255).astype(np.uint8)).save(p); paths.append(p)
    return d, paths

def _img(i=0): return Image.fromarray((np.random.default_rng(i).random((70, 90, 3)) * 255).astype(np.uint8))

def test_hog_shape_and_determinism():
    t = T.hog_teacher(CFG)
    f = t.prepare(_img())
    assert f.shape == (T.hog_dim(32, 8, 2, 9),) == (324,)
    assert torch.equal(f, t.prepare(_img())) and not torch.equal(f, t.prepare(_img(1)))
    assert T.HOGTeacher(64, 8, 2, 9).dim == 1764

@pytest.mark.parametrize('pool,dim', [('grid', 4 * 48), ('avg', 48), ('max', 48), ('none', 48 * 11 * 11)])
def test_cnn_shape_and_determinism(pool, dim):
    import dataclasses
    cfg = dataclasses.replace(CFG, pool=pool)
    a, b = T.random_teacher(cfg, seed=0, **SMALL), T.random_teacher(cfg, seed=0, **SMALL)
    x = torch.stack([a.prepare(_img(0)), a.prepare(_img(1))])
    fa = a.embed(x)
    assert fa.shape == (2, dim) and a.dim == dim
    assert torch.equal(fa, b.embed(x))
    assert not torch.equal(fa, T.random_teacher(cfg, seed=1, **SMALL).embed(x))

def test_layer_choice():
    import dataclasses
    t5 = T.random_teacher(dataclasses.replace(CFG, layer='conv5', pool='avg'), **SMALL)
    t2 = T.random_teacher(dataclasses.replace(CFG, layer='conv2', pool='avg'), **SMALL)
    assert t5.dim == 32 and t2.dim == 32  # width 0.125: conv2 256/8, conv5 256/8 channels
    with pytest.raises(KeyError, match='unknown layer'): T.random_teacher(dataclasses.replace(CFG, layer='fc6'), **SMALL)

def test_jigsaw_teacher_from_checkpoint(tmp_path):
    from kt_paper.nets import build_cfn
    from kt_paper.pretext import save_jigsaw_net
    torch.manual_seed(0); net = build_cfn(n_perms=8, init='torch', **SMALL)
    p = save_jigsaw_net(net, tmp_path/'j.pth')
    a, b = T.jigsaw_teacher(p, CFG), T.jigsaw_teacher(net, CFG)
    x = torch.stack([a.prepare(_img())])
    assert torch.equal(a.embed(x), b.embed(x)) and a.describe()['layer'] == 'conv4'
    assert a.describe()['checkpoint_sha']

def test_extraction_and_manifest(images, tmp_path):
    root, paths = images
    f = T.extract_features(T.hog_teacher(CFG), paths, tmp_path/'h.npy', root=root, labels=[i % 3 for i in range(11)],
                           dataset='demo', batch_size=4, num_workers=0)
    x, man = T.load_features(f)
    assert x.shape == (11, 324) and man['shape'] == [11, 324] and man['dtype'] == 'float32'
    assert man['ids'][0] == 'c0/00.png' and man['labels'][:4] == [0, 1, 2, 0] and man['teacher']['name'] == 'hog'
    np.testing.assert_array_equal(x[5], T.hog_teacher(CFG).prepare(Image.open(paths[5]).convert('RGB')).numpy())
    assert not (tmp_path/'h.partial.npy').exists() and not (tmp_path/'h.progress.json').exists()

def test_float16_and_workers(images, tmp_path):
    root, paths = images
    f32 = T.extract_features(T.hog_teacher(CFG), paths, tmp_path/'a.npy', batch_size=4, num_workers=0)
    f16 = T.extract_features(T.hog_teacher(CFG), paths, tmp_path/'b.npy', batch_size=3, num_workers=2, dtype='float16')
    a, b = np.load(f32), np.load(f16)
    assert b.dtype == np.float16
    np.testing.assert_allclose(a, b.astype(np.float32), atol=2e-3)

def test_resume_after_interruption(images, tmp_path):
    root, paths = images
    ref = np.load(T.extract_features(T.random_teacher(CFG, seed=0, **SMALL), paths, tmp_path/'ref.npy', batch_size=4, num_workers=0))
    t = T.random_teacher(CFG, seed=0, **SMALL); seen = []; embed = t.embed
    def flaky(x):
        if len(x) > 1: seen.append(len(x))
        if len(seen) == 2 and len(x) > 1: raise KeyboardInterrupt
        return embed(x)
    t.embed = flaky
    with pytest.raises(KeyboardInterrupt):
        T.extract_features(t, paths, tmp_path/'r.npy', batch_size=4, num_workers=0, flush_every=1)
    assert load_json(tmp_path/'r.progress.json')['done'] == 4 and not (tmp_path/'r.npy').exists()
    T.extract_features(t, paths, tmp_path/'r.npy', batch_size=4, num_workers=0, flush_every=1)
    assert seen == [4, 4, 4, 3]  # only the 7 missing images were computed after the restart
    np.testing.assert_array_equal(np.load(tmp_path/'r.npy'), ref)

def test_changed_teacher_restarts(images, tmp_path):
    root, paths = images
    T.extract_features(T.random_teacher(CFG, seed=0, **SMALL), paths, tmp_path/'r.npy', batch_size=4, num_workers=0)
    f = T.extract_features(T.random_teacher(CFG, seed=1, **SMALL), paths, tmp_path/'r.npy', batch_size=4, num_workers=0)
    ref = T.extract_features(T.random_teacher(CFG, seed=1, **SMALL), paths, tmp_path/'q.npy', batch_size=4, num_workers=0)
    np.testing.assert_array_equal(np.load(f), np.load(ref))

def test_torchvision_teacher(tmp_path):
    import torchvision
    w = tmp_path/'r18.pth'; torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), w)
    t = T.torchvision_teacher('resnet18', w, CFG, num_classes=5)
    assert t.dim == 512 and t.describe()['layer'] == 'flatten'
    t2 = T.torchvision_teacher('resnet18', w, CFG, layer='layer3.1.relu_1', num_classes=5)
    assert t2.dim == 4 * 256  # grid-pooled 2x2 of layer3's 256 channels
    with pytest.raises(KeyError, match='no node'): T.torchvision_teacher('resnet18', w, CFG, layer='nope', num_classes=5)
    with pytest.raises(ValueError, match='not a state dict'): T.torchvision_teacher('resnet18', w, CFG)

def test_bad_image_is_named(images, tmp_path):
    root, paths = images
    bad = tmp_path/'bad.png'; bad.write_bytes(b'not an image')
    with pytest.raises(Exception, match='bad.png'):
        T.extract_features(T.hog_teacher(CFG), list(paths[:2]) + [bad], tmp_path/'x.npy', batch_size=4, num_workers=0)

def test_supervised_teacher_trains(images):
    root, paths = images
    labels = [i % 3 for i in range(11)]
    trunk = T.train_supervised_teacher(paths, labels, CFG, epochs=1, bs=4, device='cpu', num_workers=0, **SMALL)
    t = T.supervised_teacher(trunk, CFG)
    x = torch.stack([t.prepare(_img())])
    assert t.embed(x).shape == (1, 4 * 48) and torch.equal(t.embed(x), t.embed(x))
    fresh = T.random_teacher(CFG, seed=0, **SMALL)
    assert not torch.equal(t.embed(x), fresh.embed(x))

def test_supervised_teacher_validates_on_held_out_images_on_its_device(images, monkeypatch):
    "Validation sees the held-out images (in order) and scores them; model and batches stay on `device`, not fastai's default."
    import sys
    from fastai.callback.core import Callback
    root, paths = images
    fake = lambda use=-1: torch.device('meta')        # fastai's default device, as CUDA would be on a GPU machine
    for m in [m for n, m in sys.modules.items() if n.startswith('fastai') and hasattr(m, 'default_device')]:
        monkeypatch.setattr(m, 'default_device', fake)
    class Seen(Callback):
        def before_fit(self): self.devices, self.ys, self.hits = set(), [], []
        def before_validate(self): self.ys, self.hits = [], []
        def before_batch(self): self.devices |= {next(self.model.parameters()).device, self.xb[0].device}
        def after_batch(self):
            if not self.training: self.ys.append(self.yb[0]); self.hits.append(self.pred.argmax(1) == self.yb[0])
        def after_fit(self): self.values = list(self.learn.recorder.values)
    seen, vlabels = Seen(), [2, 2, 0, 1, 2]
    T.train_supervised_teacher(paths[:6], [i % 3 for i in range(6)], CFG, epochs=2, bs=4, device='cpu', num_workers=0,
                               valid_paths=paths[6:], valid_labels=vlabels, cbs=[seen], **SMALL)
    assert seen.devices == {torch.device('cpu')}
    assert torch.cat(seen.ys).tolist() == vlabels
    acc = seen.values[-1][-1]          # (train loss, valid loss, accuracy) of the last epoch
    assert acc == pytest.approx(torch.cat(seen.hits).float().mean().item())
    with pytest.raises(ValueError, match='together'): T.train_supervised_teacher(paths, [0] * 11, CFG, valid_paths=paths)

def _mallinfo2():
    import ctypes
    class MI2(ctypes.Structure): _fields_ = [(k, ctypes.c_size_t) for k in 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]
    f = ctypes.CDLL(None).mallinfo2; f.restype = MI2
    return f()

@pytest.mark.skipif(__import__('platform').libc_ver()[0] != 'glibc', reason='glibc only')
def test_pin_mmap_threshold_unmaps_big_buffers():
    # a fresh process: free chunks left on this one's heap by earlier tests could serve the buffer
    import subprocess, sys, inspect
    code = inspect.getsource(_mallinfo2) + textwrap.dedent("""
        import numpy as np
        from kt_paper.teachers import pin_mmap_threshold
        assert pin_mmap_threshold()
        big = np.ones(16 << 20, np.uint8); del big  # unpinned, freeing this raises glibc's threshold to 16 MB
        before = _mallinfo2().hblkhd
        x = np.ones(4 << 20, np.uint8)              # pinned: its own mapping (unmapped on free), not heap
        print(_mallinfo2().hblkhd - before, x.nbytes)
    """)
    mapped, nbytes = map(int, subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split())
    assert mapped >= nbytes

def test_extraction_pins_threshold_same_output(images, tmp_path, monkeypatch):
    root, paths = images; calls = []; pin = T.pin_mmap_threshold
    monkeypatch.setattr(T, 'pin_mmap_threshold', lambda: False)
    ref = np.load(T.extract_features(T.random_teacher(CFG, seed=0, **SMALL), paths, tmp_path/'u.npy', batch_size=4, num_workers=2))
    monkeypatch.setattr(T, 'pin_mmap_threshold', lambda: calls.append(1) or pin())
    f = T.extract_features(T.random_teacher(CFG, seed=0, **SMALL), paths, tmp_path/'p.npy', batch_size=4, num_workers=2)
    assert calls == [1]
    np.testing.assert_array_equal(np.load(f), ref)

def _save_jigsaw(out, seed):
    from kt_paper.nets import build_cfn
    from kt_paper.pretext import save_jigsaw_net
    torch.manual_seed(seed)
    return save_jigsaw_net(build_cfn(n_perms=8, init='torch', **T.cfn_args('test')), out/'jigsaw'/'jigsaw_cfn.pth')

def test_run_teachers_stage(tmp_path):
    "run_teachers (test preset): every teacher's four feature files where 14_clustering reads them; reuse only on a fingerprint match."
    _save_jigsaw(tmp_path, 0)
    run = lambda: T.run_teachers(tmp_path, 'test', seed=0, device='cpu', num_workers=0, supervised_epochs=1)
    r = run()
    sets = T.teacher_image_sets('test', seed=0)
    assert set(r['teachers']) == {'hog', 'random', 'jigsaw', 'supervised'}
    for name, t in r['teachers'].items():
        assert set(t['files']) == {'objects_train', 'objects_val', 'scenes_train', 'scenes_val'}
        assert not any(t['reused'].values()), name
        for s, f in t['files'].items():
            assert f == str(tmp_path/'features'/name/f'{s}.npy')
            x, man = T.load_features(f)
            assert x.shape == (len(sets[s]), t['dim']) and man['labels'] == sets[s].labels.tolist()
            assert man['ids'][0] == str(sets[s].paths[0].relative_to(sets[s].root))
    cfg = T.TEACHER_PRESETS['test']
    assert r['teachers']['hog']['dim'] == T.hog_dim(cfg.hog_size, cfg.hog_cell, cfg.hog_block, cfg.hog_orientations)
    assert r['teachers']['jigsaw']['dim'] == r['teachers']['random']['dim'] == r['teachers']['supervised']['dim']
    feats = lambda name: np.load(tmp_path/'features'/name/'objects_train.npy')
    before = {n: feats(n) for n in r['teachers']}
    mtimes = {f: Path(f).stat().st_mtime_ns for t in r['teachers'].values() for f in t['files'].values()}
    sup_mtime = (tmp_path/'teachers'/'supervised_trunk.pth').stat().st_mtime_ns
    r2 = run()                                                  # nothing changed: everything reused
    assert all(all(t['reused'].values()) for t in r2['teachers'].values())
    assert {f: Path(f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert (tmp_path/'teachers'/'supervised_trunk.pth').stat().st_mtime_ns == sup_mtime
    _save_jigsaw(tmp_path, 1)                                   # a retrained Jigsaw++ teacher: its features only
    r3 = run()
    assert not any(r3['teachers']['jigsaw']['reused'].values())
    assert all(all(r3['teachers'][n]['reused'].values()) for n in ('hog', 'random', 'supervised'))
    assert not np.array_equal(feats('jigsaw'), before['jigsaw'])
    for n in ('hog', 'random', 'supervised'): np.testing.assert_array_equal(feats(n), before[n])

def test_run_teachers_checkpoint_choice(tmp_path):
    "Without a Jigsaw++ checkpoint there is no jigsaw teacher (a random trunk is never one); an explicit missing one is an error."
    assert T.jigsaw_checkpoint(tmp_path) == tmp_path/'jigsaw'/'jigsaw_cfn.pth'
    legacy = tmp_path/'teachers'/'jigsaw_cfn.pth'; legacy.parent.mkdir(); legacy.write_bytes(b'')
    assert T.jigsaw_checkpoint(tmp_path) == legacy
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        T.run_teachers(tmp_path, 'test', device='cpu', jigsaw_ckpt=tmp_path/'nope.pth')
    assert list(T.stage_teachers(tmp_path/'empty', 'test', T.TEACHER_PRESETS['test'])) == ['hog', 'random']

def test_supervised_trunk_reused_only_when_made_the_same_way(tmp_path):
    import dataclasses
    s = T.teacher_image_sets('test', seed=0)['objects_train']
    p = tmp_path/'sup.pth'
    make = lambda images, epochs=1: T.supervised_trunk(images, p, CFG, epochs=epochs, device='cpu', num_workers=0, **SMALL)
    a = make(s); m = p.stat().st_mtime_ns
    b = make(s)
    assert p.stat().st_mtime_ns == m and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    moved = dataclasses.replace(s, items=[dataclasses.replace(it, label=(it.label + 1) % len(s.classes)) for it in s.items])
    make(moved); m2 = p.stat().st_mtime_ns
    assert m2 != m                                      # other labels: trained again
    make(moved, epochs=2); assert p.stat().st_mtime_ns != m2   # other epochs: trained again

def test_run_teachers_trains_missing_pretext_teacher(tmp_path):
    "train_jigsaw=True (the default at `tiny` only): the pretext stage's teacher is trained first, then used."
    from kt_paper.train import digest
    r = T.run_teachers(tmp_path, 'test', device='cpu', num_workers=0, train_jigsaw=True)
    ck = tmp_path/'jigsaw'/'jigsaw_cfn.pth'
    assert ck.exists() and r['teachers']['jigsaw']['teacher']['checkpoint_sha'] == digest(ck)
    assert T.load_features(r['teachers']['jigsaw']['files']['scenes_val'])[1]['teacher']['checkpoint'] == str(ck)

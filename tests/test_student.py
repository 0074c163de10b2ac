from collections import OrderedDict
"Tests of kt_paper.student: AlexNet shapes per preset, checkpoints, CFN transfer, CC training and resume, data roles."
import os
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from kt_paper.core import seed_everything, load_json
from kt_paper.train import fit, step_lr, process_batch_size
from kt_paper.nets import CONV_LAYERS, build_alexnet, activation_shapes, save_alexnet, load_alexnet
from kt_paper.student import (STUDENT_PRESETS, alexnet_from_cfn, balanced_sampler, synthetic_images, train_student, ImageTensorDataset,
                              make_student_dls, student_learner, evaluate_top1,
                              read_student_data, run_student_job, decode_image)

SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', Path(__file__).resolve().parents[1].parent/'shared'/'data'))

EXPECTED = {  # (C, H, W) of conv1..conv5 and pool5 at each preset's crop
    'paper': [(96, 55, 55), (256, 27, 27), (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6)],
    'small': [(24, 51, 51), (64, 25, 25), (96, 12, 12), (96, 12, 12), (64, 12, 12), (64, 6, 6)],   # width 1/4
    'tiny':  [(24, 27, 27), (64, 13, 13), (96, 6, 6), (96, 6, 6), (64, 6, 6), (64, 3, 3)],
    'test':  [(16, 19, 19), (32, 9, 9), (48, 4, 4), (48, 4, 4), (32, 4, 4), (32, 2, 2)],
}

@pytest.mark.parametrize('preset', list(EXPECTED))
def test_alexnet_shapes_per_preset(preset):
    cfg = STUDENT_PRESETS[preset]
    net = build_alexnet(10, **{**cfg.alexnet_args(), 'fc_dim': 16})
    shp = activation_shapes(net)
    assert [shp[n] for n in (*CONV_LAYERS, 'pool5')] == EXPECTED[preset]
    assert net.classifier.fc6.fc.in_features == int(np.prod(EXPECTED[preset][-1]))
    assert net(torch.zeros(2, 3, cfg.crop, cfg.crop)).shape == (2, 10)

def test_paper_alexnet_is_caffe_alexnet():
    net = build_alexnet(1000)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
    assert net.features.conv1.conv.stride == (4, 4) and net.features.conv2.conv.groups == 2
    assert isinstance(net.features.norm1, nn.LocalResponseNorm)
    assert net.classifier.fc6.drop.p == 0.5 and net.classifier.fc7.fc.out_features == 4096

def test_checkpoint_roundtrip(tmp_path):
    net = build_alexnet(5, width=0.125, bn=True, conv1_stride=2, input_size=48).eval()
    save_alexnet(net, tmp_path/'m.pth')
    back = load_alexnet(tmp_path/'m.pth').eval()
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(net(x), back(x))
    assert back.args == net.args

def test_from_cfn_copies_convs():
    src = build_alexnet(3, width=0.25, bn=True, conv1_stride=2, input_size=64)
    trunk = nn.Sequential(OrderedDict((n, getattr(src.features, n)) for n in CONV_LAYERS))
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(); m.running_var.uniform_(0.5, 2)
    net = alexnet_from_cfn(trunk, 7, input_size=64)
    for n in CONV_LAYERS:
        assert torch.equal(getattr(net.features, n).conv.weight, getattr(trunk, n).conv.weight)
        assert torch.equal(getattr(net.features, n).bn.running_var, getattr(trunk, n).bn.running_var)
    assert net.classifier.fc8.out_features == 7

def test_from_real_cfn_paper_stride():
    from kt_paper.nets import build_cfn
    cfn = build_cfn('alexnet', n_perms=8)
    net = alexnet_from_cfn(cfn, 10, input_size=227)
    assert net.features.conv1.conv.stride == (4, 4)           # the CFN's stride-2 conv1 becomes AlexNet's stride 4
    assert torch.equal(net.features.conv1.conv.weight, cfn.trunk.conv1[0].weight)
    assert activation_shapes(net)['pool5'] == (256, 6, 6)

def test_balanced_sampler_evens_out_labels():
    lab = np.array([0]*95 + [1]*5)
    torch.manual_seed(0)
    drawn = lab[list(iter(balanced_sampler(lab, 2000)))]
    assert 0.4 < drawn.mean() < 0.6

def test_step_lr():
    f = step_lr(0.01, (2, 3), 4)
    assert [round(f(p), 6) for p in (0, 0.49, 0.5, 0.75, 0.99)] == [0.01, 0.01, 0.001, 0.0001, 0.0001]

def _toy(n_train=96, n_val=48, size=52):
    (xi, yi), (xv, yv) = synthetic_images(n_train, size), synthetic_images(n_val, size, seed=1)
    return xi, yi, xv, yv

def test_cc_learns_two_separable_pseudo_classes():
    cfg = STUDENT_PRESETS['test']
    xi, yi, xv, yv = _toy(size=cfg.resize)
    seed_everything(0)
    dls = make_student_dls(ImageTensorDataset(xi, yi, cfg.crop, True), ImageTensorDataset(xv, yv, cfg.crop, False), cfg.bs, num_workers=0)
    learn = student_learner(build_alexnet(2, **cfg.alexnet_args()), dls, cfg); fit(learn, 3)
    assert evaluate_top1(learn.model, dls.valid) > 0.9

class _StopAfterFirstEpoch(Callback):
    order = 100  # after the epoch's checkpoint
    def after_epoch(self):
        if self.epoch == 0: raise CancelFitException

def test_resume_gives_same_weights(tmp_path):
    from dataclasses import replace
    cfg = replace(STUDENT_PRESETS['test'], epochs=3, lr_milestones=(2,), balanced=True)
    xi, yi, xv, yv = _toy(64, 32, cfg.resize)
    args = dict(train_paths=[None]*len(yi), train_labels=yi, val_paths=[None]*len(yv), val_labels=yv, cfg=cfg,
                n_classes=2, seed=3, images=(xi, xv), num_workers=0)
    full = train_student(out_dir=tmp_path/'full', **args)
    part = train_student(out_dir=tmp_path/'part', cbs=[_StopAfterFirstEpoch()], **args)
    assert part == dict(finished=False) and not (tmp_path/'part'/'final.pth').exists()
    resumed = train_student(out_dir=tmp_path/'part', **args)
    a, b = load_alexnet(tmp_path/'full'/'final.pth').state_dict(), load_alexnet(tmp_path/'part'/'final.pth').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full['val_top1'] == resumed['val_top1']

def test_process_batch_size():
    assert process_batch_size(STUDENT_PRESETS['paper'].bs, 8) == 32 and process_batch_size(STUDENT_PRESETS['tiny'].bs, 1) == 64
    with pytest.raises(ValueError, match='does not split'): process_batch_size(STUDENT_PRESETS['tiny'].bs, 3)

def _png_tree(root, n_train=8, n_val=4, size=32):
    from PIL import Image
    xs, ys = synthetic_images(n_train + n_val, size)
    for n, (x, y) in enumerate(zip(xs, ys)):
        f = root/('train' if n < n_train else 'val')/f'c{y}'/f'{n:02d}.png'; f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(f)
    return root

def test_run_student_job_labels_and_shared_images(tmp_path):
    "Pseudo-labels from a CSV; in-process `images` give the same student as decoding the files."
    from dataclasses import replace
    from kt_paper.clustering import save_pseudo_labels
    from kt_paper.student import decode_images
    root = _png_tree(tmp_path/'data')
    tp, ytr, vp, yva, classes = read_student_data(root)
    rel = lambda ps: [Path(p).relative_to(root).as_posix() for p in ps]
    save_pseudo_labels(tmp_path/'tr.csv', rel(tp), (np.arange(8) % 3)); save_pseudo_labels(tmp_path/'va.csv', rel(vp), [0, 1, 2, 0])
    args = dict(root=str(root), train_labels=str(tmp_path/'tr.csv'), val_labels=str(tmp_path/'va.csv'), preset='test', epochs=1, device='cpu')
    a = run_student_job(str(tmp_path/'files'), **args)
    cfg = STUDENT_PRESETS['test']
    b = run_student_job(str(tmp_path/'mem'), images=(decode_images(tp, cfg.resize), decode_images(vp, cfg.resize)), **args)
    assert a['n_classes'] == b['n_classes'] == 3 and a['train_images'] == 8 and a['processes'] == 1
    wa, wb = load_alexnet(tmp_path/'files'/'final.pth').state_dict(), load_alexnet(tmp_path/'mem'/'final.pth').state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    again = run_student_job(str(tmp_path/'files'), **args)             # a finished student is reused as is
    assert again['val_top1'] == a['val_top1'] and again['seconds'] == a['seconds']
    save_pseudo_labels(tmp_path/'bad.csv', ['train/c0/xx.png'], [0])
    with pytest.raises(KeyError, match='no pseudo-label'):
        run_student_job(str(tmp_path/'bad'), **{**args, 'train_labels': str(tmp_path/'bad.csv')})

@pytest.mark.skipif(not (SHARED/'imagenette2-mini').exists(), reason=f'real sample data not found at {SHARED}')
@pytest.mark.parametrize('role', ['imagenet', 'places'])
def test_small_preset_roles_on_real_samples(role, tmp_path):
    "At `small`, objects = the ImageNet role (imagenette2-mini) and scenes = the Places role (miniplaces-mini)."
    from kt_paper.data import DATA_PRESETS
    from kt_paper.clustering import save_pseudo_labels
    root = SHARED/getattr(DATA_PRESETS['small'], role)
    tp, ytr, vp, yva, classes = read_student_data(root)
    n_cls = dict(imagenet=10, places=100)[role]
    assert (len(tp), len(vp), len(classes)) == (2000, 500, n_cls)
    assert set(ytr.tolist()) == set(yva.tolist()) == set(range(n_cls))
    assert all(Path(p).parent.name == classes[y] for p, y in zip(tp + vp, list(ytr) + list(yva)))
    if role == 'imagenet':   # wnid folders of .JPEG files, some grayscale: decoded to 3 channels
        assert classes[0] == 'n01440764' and tp[0].endswith('.JPEG')
        assert decode_image(root/'train'/'n02102040'/'n02102040_1408.JPEG', 52).shape == (3, 52, 52)
    else: assert 'classes.txt' not in classes and tp[0].endswith('.jpg')
    # pseudo-labels keyed by paths relative to the role's folder, as the clustering stage writes them (shuffled rows)
    rng = np.random.default_rng(0); pl = rng.integers(0, 7, len(tp)); order = rng.permutation(len(tp))
    save_pseudo_labels(tmp_path/'pl.csv', [Path(tp[i]).relative_to(root).as_posix() for i in order], pl[order])
    assert (read_student_data(root, str(tmp_path/'pl.csv'), yva.tolist())[1] == pl).all()

def test_reclustering_retrains_the_student(tmp_path):
    "Another k in the same run folder: the student is retrained on the new pseudo-labels, not reused (fingerprint)."
    from kt_paper.clustering import save_pseudo_labels
    root = _png_tree(tmp_path/'data')
    tp, _, vp, _, _ = read_student_data(root)
    rel = lambda ps: [Path(p).relative_to(root).as_posix() for p in ps]
    out = tmp_path/'student'
    runs = {}
    for k in (2, 3):
        save_pseudo_labels(tmp_path/f'tr{k}.csv', rel(tp), np.arange(8) % k); save_pseudo_labels(tmp_path/f'va{k}.csv', rel(vp), np.arange(4) % k)
        runs[k] = run_student_job(str(out), str(root), str(tmp_path/f'tr{k}.csv'), str(tmp_path/f'va{k}.csv'), preset='test', epochs=1, device='cpu')
    assert runs[2]['n_classes'] == 2 and runs[3]['n_classes'] == 3 and runs[2]['fingerprint'] != runs[3]['fingerprint']
    assert load_alexnet(out/'final.pth').classifier.fc8.out_features == 3
    assert load_json(out/'metrics.json')['fingerprint'] == runs[3]['fingerprint']
    mtime = (out/'final.pth').stat().st_mtime_ns
    again = run_student_job(str(out), str(root), str(tmp_path/'tr3.csv'), str(tmp_path/'va3.csv'), preset='test', epochs=1, device='cpu')
    assert again == load_json(out/'metrics.json') and (out/'final.pth').stat().st_mtime_ns == mtime   # same inputs: reused

def test_cfn_models_see_inputs_at_their_training_scale():
    "A CFN trained on tiles x tile_scale=50 sees inputs of that scale when probed (linear probes) or fine-tuned (VOC)."
    from kt_paper.nets import build_cfn
    from kt_paper.jigsaw import JIGSAW_PRESETS
    from kt_paper.pretext import cfn_from_config
    from kt_paper.images import imagenet_normalize
    from kt_paper.probes import LinearProbes
    from kt_paper.finetune import conv_trunk
    from kt_paper.teachers import jigsaw_teacher, TEACHER_PRESETS
    import dataclasses
    cfg = dataclasses.replace(JIGSAW_PRESETS['test'], tile_scale=50.)                 # the paper preset's factor
    cfn = cfn_from_config(cfg)
    assert cfn.build_args['input_scale'] == 50
    net = alexnet_from_cfn(cfn, 3, input_size=48).eval()
    seen = []
    hook = lambda m, i, o: seen.append(i[0].std().item())
    x = imagenet_normalize(torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8))   # what every consumer feeds
    for model in (LinearProbes(net, 3, input_size=48).trunk, conv_trunk(net)):
        conv1 = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        h = conv1.register_forward_hook(hook)
        with torch.no_grad(): model(x)
        h.remove()
    assert len(seen) == 2 and all(abs(s - 50) < 1 for s in seen), seen                   # not ~1 (ImageNet-normalised)
    assert load_alexnet_roundtrip(net).args['input_scale'] == 50
    assert jigsaw_teacher(cfn, TEACHER_PRESETS['test']).scale == 50                     # the teacher too, by default

def load_alexnet_roundtrip(net):
    import tempfile
    with tempfile.TemporaryDirectory() as d: save_alexnet(net, Path(d)/'a.pth'); return load_alexnet(Path(d)/'a.pth')

def test_stage_reclustering_with_another_k_retrains_on_the_new_labels(tmp_path):
    """The issue's scenario through the stages: cluster, train the students, re-cluster with another k in the same run
    folder; the CC student is retrained and its labels are the new clusters' (the current clustering is recorded)."""
    from kt_paper.teachers import run_teachers
    from kt_paper.clustering import run_clustering, load_pseudo_labels, current_clusterings
    from kt_paper.student import run_student
    run_teachers(tmp_path, 'test', seed=0, device='cpu', train_jigsaw=False)
    runs = []
    for k in (3, 5, 3):                 # and back: a clustering reused from before must be the one used again
        run_clustering(tmp_path, 'test', seed=0, device='cpu', teachers='hog', ablation_ks=(), k=k)
        st = run_student(tmp_path, 'test', seed=0, device='cpu', cc_teachers='hog', quiet=True)
        runs.append(st['students']['cc_hog'])
        cdir = current_clusterings(tmp_path/'clusters'/'hog')['objects_train']
        assert f'-k{k}-' in cdir.name
        model = load_alexnet(tmp_path/'student'/'cc_hog'/'final.pth')
        assert model.classifier.fc8.out_features == max(load_pseudo_labels(cdir/'pseudo_labels_objects_train.csv').labels) + 1
    assert runs[0]['fingerprint'] != runs[1]['fingerprint'] and runs[2]['fingerprint'] == runs[0]['fingerprint']
    assert load_json(tmp_path/'student'/'cc_hog'/'metrics.json')['fingerprint'] == runs[2]['fingerprint']


def test_student_recipe_options():
    "The architecture and schedule fields reach the network and the learner; an unknown schedule is refused by name."
    import dataclasses
    from kt_paper.student import STUDENT_PRESETS, student_learner
    cfg = dataclasses.replace(STUDENT_PRESETS['test'], conv1_kernel=5, conv1_pad=2, groups=1, fc_dim=32, schedule='one_cycle')
    net = build_alexnet(3, **cfg.alexnet_args())
    assert net.features.conv1.conv.kernel_size == (5, 5) and net.features.conv1.conv.padding == (2, 2)
    assert all(m.groups == 1 for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert net.classifier.fc8.in_features == 32
    sched = next(cb for cb in student_learner(net, None, cfg).cbs if type(cb).__name__ == 'ParamScheduler')
    assert set(sched.scheds) == {'lr', 'mom'}
    lr = sched.scheds['lr']; assert lr(0.) < lr(0.25) and abs(lr(0.25) - cfg.lr) < 1e-9 and lr(1.) < cfg.lr / 100
    with pytest.raises(ValueError, match='schedule'):
        student_learner(net, None, dataclasses.replace(cfg, schedule='cosine'))

def test_a_change_in_the_code_retrains_the_student(tmp_path, monkeypatch):
    "The student's fingerprint follows the code that trains it (`code_digest('kt_paper.student')`): same inputs, other code, retrained."
    import kt_paper.student as ks
    cfg = STUDENT_PRESETS['test']
    xi, yi, xv, yv = _toy(16, 8, cfg.resize)
    args = dict(train_paths=[None]*len(yi), train_labels=yi, val_paths=[None]*len(yv), val_labels=yv, cfg=cfg,
                n_classes=2, seed=0, images=(xi, xv), num_workers=0, out_dir=tmp_path/'s')
    first = train_student(**args); mtime = (tmp_path/'s'/'final.pth').stat().st_mtime_ns
    assert train_student(**args)['fingerprint'] == first['fingerprint'] and (tmp_path/'s'/'final.pth').stat().st_mtime_ns == mtime   # reused
    monkeypatch.setattr(ks, 'code_digest', lambda *m: 'an edited kt_paper/train.py')
    second = train_student(**args)
    assert second['fingerprint'] != first['fingerprint'] and load_json(tmp_path/'s'/'metrics.json')['fingerprint'] == second['fingerprint']
    assert (tmp_path/'s'/'final.pth').stat().st_mtime_ns != mtime                                                                   # retrained

def test_run_student_takes_images_decoded_by_the_caller(tmp_path, monkeypatch):
    "`images=`: the stage decodes nothing itself (the seed-noise run shares the probes' decoded set); wrong shapes are refused."
    import kt_paper.student as ks
    from kt_paper.data import DATA_PRESETS, dataset_roots
    root = dataset_roots(DATA_PRESETS['test'])['imagenet']
    tp, _, vp, _, _ = read_student_data(root)
    imgs = ks.decode_images(tp, STUDENT_PRESETS['test'].resize), ks.decode_images(vp, STUDENT_PRESETS['test'].resize)
    monkeypatch.setattr(ks, 'decode_images', lambda *a: pytest.fail('decoded again'))
    r = ks.run_student(tmp_path, 'test', seed=0, device='cpu', cc_teachers='', extras=False, quiet=True, images=imgs)
    assert r['made'] == ['random'] and (tmp_path/'student'/'random'/'final.pth').exists()
    with pytest.raises(ValueError, match='objects images'): ks.run_student(tmp_path, 'test', device='cpu', extras=False, quiet=True, images=(imgs[0][:3], imgs[1]))

# --- issue 37: uint8 batches from the loaders, normalised on the device ---------------------------------------------
from kt_paper.student import crop_flip_normalize_batch, image_dataset

class _OldLoaderDS(ImageTensorDataset):
    "The loaders before issue 37: each batch cropped, mirrored and ImageNet-normalised in the loader (float32)."
    def __getitem__(self, i): return crop_flip_normalize_batch(self.images[i][None], self.crop, self.train)[0], self.labels[i]
    def __getitems__(self, idx): return [crop_flip_normalize_batch(self.images, self.crop, self.train, idx), self.labels[torch.as_tensor(idx)]]

class _Inputs(Callback):
    "Record what the network is fed (after every callback that shapes its input)."
    order = 50
    def __init__(self): self.xs = []
    def before_batch(self): self.xs.append(self.learn.xb[0].detach().clone())

def _fed(ds_cls, seed=0):
    cfg = STUDENT_PRESETS['test']
    xi, yi, xv, yv = _toy(24, 16, size=cfg.resize)
    seed_everything(seed)
    dls = make_student_dls(ds_cls(xi, yi, cfg.crop, True), ds_cls(xv, yv, cfg.crop, False), 8, num_workers=0)
    rec = _Inputs(); learn = student_learner(build_alexnet(2, **cfg.alexnet_args()), dls, cfg)
    fit(learn, 1, precision='fp32', cbs=[rec])
    return dls, rec.xs

def test_student_loaders_yield_uint8():
    cfg = STUDENT_PRESETS['test']
    xi, yi, _, _ = _toy(24, 16, size=cfg.resize)
    for train in (True, False):
        dls = make_student_dls(ImageTensorDataset(xi, yi, cfg.crop, train), ImageTensorDataset(xi, yi, cfg.crop, False), 8, num_workers=0)
        x, y = next(iter(dls.train))
        assert x.dtype == torch.uint8 and x.shape == (8, 3, cfg.crop, cfg.crop) and y.dtype == torch.long
    assert image_dataset(None, yi, cfg, True, images=xi).images.element_size() == 1   # the in-memory cache: 1 byte per value

def test_student_network_sees_the_old_normalised_input():
    _, old = _fed(_OldLoaderDS)
    dls, new = _fed(ImageTensorDataset)
    assert next(iter(dls.train))[0].dtype == torch.uint8   # what changed: the loader's batches ...
    assert len(new) == len(old) > 2                        # ... not what the network is fed (train and valid batches)
    for a, b in zip(new, old): assert a.dtype == torch.float32 and torch.equal(a, b)

def test_student_loaders_pin_for_cuda():
    cfg = STUDENT_PRESETS['test']
    xi, yi, _, _ = _toy(8, 8, size=cfg.resize)
    ds = ImageTensorDataset(xi, yi, cfg.crop, True)
    assert [dl.pin_memory for dl in make_student_dls(ds, ds, 4, num_workers=0, device='cuda').loaders] == [True, True]
    assert [dl.pin_memory for dl in make_student_dls(ds, ds, 4, num_workers=0, device='cpu').loaders] == [False, False]

def test_evaluate_top1_normalises_uint8_batches():
    cfg = STUDENT_PRESETS['test']
    xi, yi, _, _ = _toy(16, 8, size=cfg.resize)
    torch.manual_seed(0); net = build_alexnet(2, **cfg.alexnet_args()).eval()
    new = make_student_dls(ImageTensorDataset(xi, yi, cfg.crop, False), ImageTensorDataset(xi, yi, cfg.crop, False), 8, num_workers=0)
    old = make_student_dls(_OldLoaderDS(xi, yi, cfg.crop, False), _OldLoaderDS(xi, yi, cfg.crop, False), 8, num_workers=0)
    assert next(iter(new.valid))[0].dtype == torch.uint8
    assert evaluate_top1(net, new.valid) == evaluate_top1(net, old.valid)

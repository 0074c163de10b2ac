"Tests of kt_paper.finetune, kt_paper.segmentation and kt_paper.transfer: VOC readers, heads, augmentation, step-counted training on a Learner, each protocol, the transfer tables (kt_paper.report) and the stage end to end on tiny data."
import dataclasses, os
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from kt_paper.data import AnnotationError
from kt_paper.finetune import (VOCImage, read_voc_split, read_voc_seg_split, class_labels, conv_trunk, trunk_channels,
                               epoch_plan, StepDraws, train_steps, random_crop_flip)
from kt_paper.transfer import (TRANSFER_PRESETS, ClsConfig, TransferConfig, TrunkClassifier, masked_bce, det_target,
                               to_voc_boxes, voc07_classification, voc07_detection, transfer_student, find_students, run_transfer)
from kt_paper.segmentation import SegConfig, LightFCN, read_mask, voc12_segmentation
from kt_paper.report import (transfer_rows, write_transfer_table, TRANSFER_COLUMNS, ablation_students, k_ablation_rows,
                             domain_ablation_rows, student_label, describe_setup)
from kt_paper.nets import build_alexnet, save_alexnet
from kt_paper.student import STUDENT_PRESETS
from kt_paper.train import step_lr

torch.set_num_threads(1)
SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', Path(__file__).resolve().parents[1].parent/'shared'/'data'))
MINI = SHARED/'voc2007-mini'/'VOCdevkit'/'VOC2007'
CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable', 'dog',
           'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')


def _xml(objs, w=64, h=48, fn='x.jpg'):
    o = ''.join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objs)
    return f"<annotation><filename>{fn}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{o}</annotation>"


@pytest.fixture(scope='module')
def toy_voc(tmp_path_factory):
    "A hand-made VOCdevkit (2007 with boxes, 2012 with masks): 12 images of 64x48, one coloured box each."
    root = tmp_path_factory.mktemp('voc')
    v7, v12 = root/'VOCdevkit'/'VOC2007', root/'VOCdevkit'/'VOC2012'
    rng = np.random.default_rng(0); ids = [f'{i:06d}' for i in range(1, 13)]
    for v in (v7, v12):
        for d in ('JPEGImages', 'Annotations', 'ImageSets/Main', 'ImageSets/Segmentation', 'SegmentationClass'): (v/d).mkdir(parents=True)
    for n, i in enumerate(ids):
        c = n % 3                                          # classes 0, 1, 2 (aeroplane, bicycle, bird), one colour each
        x0, y0 = int(rng.integers(1, 30)), int(rng.integers(1, 20)); x1, y1 = x0 + 25, y0 + 20
        img = np.full((48, 64, 3), 90, np.uint8); img[y0-1:y1, x0-1:x1] = [(230, 20, 20), (20, 230, 20), (20, 20, 230)][c]
        mask = np.zeros((48, 64), np.uint8); mask[y0-1:y1, x0-1:x1] = c + 1; mask[y0-1, x0-1:x1] = 255
        objs = [(CLASSES[c], 0, (x0, y0, x1, y1))] + ([(CLASSES[3], 1, (2, 2, 12, 12))] if n == 0 else [])
        for v in (v7, v12):
            Image.fromarray(img).save(v/'JPEGImages'/f'{i}.jpg', quality=95)
            (v/'Annotations'/f'{i}.xml').write_text(_xml(objs))
            p = Image.fromarray(mask, 'P'); p.putpalette([0, 0, 0] * 256); p.save(v/'SegmentationClass'/f'{i}.png')
    for v in (v7, v12):
        for split, s in (('trainval', ids[:8]), ('test', ids[8:]), ('train', ids[:8]), ('val', ids[8:])):
            (v/'ImageSets'/'Main'/f'{split}.txt').write_text('\n'.join(s) + '\n')
            (v/'ImageSets'/'Segmentation'/f'{split}.txt').write_text('\n'.join(s) + '\n')
    return v7, v12


@pytest.fixture(scope='module')
def alexnet():
    torch.manual_seed(0)
    return build_alexnet(20, width=0.125, bn=True, conv1_stride=2, input_size=48)


def test_readers(toy_voc):
    v7, v12 = toy_voc
    ims = read_voc_split(v7, 'trainval')
    assert len(ims) == 8 and ims[0].id == '000001' and ims[0].width == 64
    assert ims[0].labels.tolist() == [0, 3] and ims[0].difficult.tolist() == [False, True]
    lab = class_labels(ims)
    assert lab[0, 0] == 1 and lab[0, 3] == 0 and lab[0, 1] == -1 and lab[1, 1] == 1
    pairs = read_voc_seg_split(v12, 'val'); assert len(pairs) == 4
    assert set(np.unique(read_mask(pairs[0][1]).numpy())) <= {0, 1, 2, 3, 255}
    with pytest.raises(AnnotationError, match='split file'): read_voc_split(v7, 'nosuch')


def test_bad_annotation_is_named(toy_voc, tmp_path):
    import shutil
    v = tmp_path/'VOC2007'; shutil.copytree(toy_voc[0], v)
    (v/'Annotations'/'000002.xml').write_text(_xml([('unicorn', 0, (1, 1, 5, 5))]))
    with pytest.raises(AnnotationError, match='000002.xml.*unknown class'): read_voc_split(v, 'trainval')


def test_trunks_and_heads(alexnet):
    t = conv_trunk(alexnet, keep_pool5=False)
    assert 'pool5' not in dict(t.named_children()) and 'pool5' in dict(conv_trunk(alexnet).named_children())
    assert trunk_channels(t) == alexnet.args['channels'][-1]
    t.conv1.conv.weight.data.zero_()                               # a copy: the student is untouched
    assert alexnet.features.conv1.conv.weight.abs().sum() > 0
    clf = TrunkClassifier(conv_trunk(alexnet), 48, 20, 32)
    assert clf(torch.zeros(2, 3, 48, 48)).shape == (2, 20)
    fcn = LightFCN(conv_trunk(alexnet, False), 21, 16)
    assert fcn(torch.zeros(1, 3, 50, 70)).shape == (1, 21, 50, 70)  # upsampled to the input size


def test_masked_bce_ignores_difficult():
    l = torch.tensor([[5., -5., 100.]])
    a = masked_bce(l, torch.tensor([[1, -1, 0]]))
    b = masked_bce(l[:, :2], torch.tensor([[1, -1]]))
    assert torch.allclose(a, b)


def test_masked_bce_sums_classes_per_image():
    "The reference's SigmoidCrossEntropyLoss: zero logits, all-positive labels, 2 images -> 20 ln 2 (summed over the classes, / images)."
    import math
    assert masked_bce(torch.zeros(2, 20), torch.ones(2, 20, dtype=torch.long)).item() == pytest.approx(20 * math.log(2))
    half = torch.ones(2, 20, dtype=torch.long); half[1] = 0                  # the second image: all difficult, still counted as an image
    assert masked_bce(torch.zeros(2, 20), half).item() == pytest.approx(10 * math.log(2))


def test_classification_biases_at_twice_the_lr(toy_voc, alexnet):
    "philkr/voc-classification's setLR(t, 1, 2) and setDecay(t, 1, 1): biases at lr x2, with the weights' weight decay."
    from kt_paper.transfer import ClsDraws
    from kt_paper.finetune import ImageStore
    p = TRANSFER_PRESETS['paper'].cls
    assert (p.bias_lr_mult, p.bias_decay_mult, p.lr, p.clip) == (2., 1., 1e-3, 10.)
    ims = read_voc_split(toy_voc[0], 'trainval')
    cfg = dataclasses.replace(CLS, iters=1)
    net = TrunkClassifier(conv_trunk(alexnet), cfg.crop, 20, 32)
    learn = train_steps(net, ClsDraws(ImageStore([i.path for i in ims]), torch.from_numpy(class_labels(ims)), cfg), cfg, masked_bce, precision='fp32')
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([2 * cfg.lr, cfg.lr]) and [h['wd'] for h in learn.opt.hypers] == pytest.approx([cfg.wd] * 2)
    biases = {id(q) for q in learn.opt.param_lists[0]}
    assert {n for n, q in learn.model.named_parameters() if id(q) in biases} == {n for n, _ in learn.model.named_parameters() if n.endswith('bias')}


def test_lr_schedule_paper_presets():
    c = TRANSFER_PRESETS['paper']
    lr = lambda p, step: step_lr(p.lr, p.milestones, p.iters, p.gamma)(step / p.iters)   # fastai's pct of the run -> lr
    assert lr(c.cls, 0) == 1e-3 and lr(c.cls, 9_999) == 1e-3 and lr(c.cls, 10_000) == pytest.approx(5e-4)
    assert lr(c.cls, 79_999) == pytest.approx(1e-3 / 2**7)
    assert [lr(c.seg, s) for s in (0, 50_000, 100_000)] == pytest.approx([1e-4, 1e-5, 1e-6])
    assert [lr(c.det, s) for s in (49_999, 50_000, 149_999)] == pytest.approx([1e-3, 1e-4, 1e-5])
    for p in (c.cls, c.det, c.seg):                                  # whole epochs of the checkpoint interval
        assert epoch_plan(p.iters, TRANSFER_PRESETS['paper'].ckpt_every)[1] == TRANSFER_PRESETS['paper'].ckpt_every
    assert (c.cls.bs, c.cls.wd, c.cls.clip, c.cls.crop, c.cls.test_crops, c.cls.scale_range) == (16, 1e-6, 10., 227, 10, (.5, 2.))
    assert (c.det.iters, c.det.min_size, c.det.max_size, c.seg.iters, c.seg.momentum, c.seg.wd) == (150_000, 600, 1000, 150_000, .9, 5e-4)
    with pytest.raises(dataclasses.FrozenInstanceError): c.cls.lr = 1.


def test_crop_flip_keeps_image_and_mask_aligned():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(30 * 40).view(30, 40)
    for _ in range(10):
        xc, yc = random_crop_flip(y[None].float(), 20, g, y=y.clone())
        assert torch.equal(xc[0].long(), yc)


def test_det_target_roundtrip_and_flip():
    im = VOCImage('a', Path('a.jpg'), 100, 50, np.array([[1., 1, 10, 20], [50, 5, 100, 50]]), np.array([4, 7]), np.array([False, True]))
    t = det_target(im)
    assert t['labels'].tolist() == [5] and t['boxes'].tolist() == [[0., 0., 10., 20.]]
    np.testing.assert_allclose(to_voc_boxes(t['boxes']), [[1, 1, 10, 20]])
    assert det_target(im, flip=True)['boxes'].tolist() == [[90., 0., 100., 20.]]


class _Bin(StepDraws):
    "A toy binary problem: draw k is a random 4-vector and whether its first entry is positive."
    def item(self, i, g): x = torch.randn(4, generator=g); return x, (x[:1] > 0).float()


@dataclasses.dataclass(frozen=True)
class _C: iters:int=6; bs:int=8; lr:float=.05; milestones:tuple=(4,); gamma:float=.1; momentum:float=.9; wd:float=1e-4; clip:float=1.


def _bin_run(folder=None, cbs=None, cfg=_C(), every=2, num_workers=0, fp='x'):
    torch.manual_seed(0); m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(.3), torch.nn.Linear(8, 1))
    return train_steps(m, _Bin(3, cfg.iters, cfg.bs), cfg, torch.nn.functional.binary_cross_entropy_with_logits, folder=folder,
                       fingerprint=fp, every=every, precision='fp32', num_workers=num_workers, cbs=cbs)


def test_train_steps_is_deterministic_and_resumes(tmp_path):
    from fastai.callback.core import Callback, CancelFitException
    class StopAfter2(Callback):
        order = 100
        def after_epoch(self):
            if self.epoch == 1: raise CancelFitException()
    a, b = _bin_run(), _bin_run(num_workers=2)                       # loader workers change nothing
    assert torch.equal(a.model[0].weight, b.model[0].weight)
    assert a.recorder.hps['lr'] == pytest.approx([.05] * 4 + [.005] * 2)   # milestone at step 4, in steps
    _bin_run(tmp_path, cbs=[StopAfter2()])
    c = _bin_run(tmp_path)
    assert c.resumed_from_step == 4 and torch.allclose(a.model[0].weight, c.model[0].weight, atol=1e-7)
    assert (tmp_path/'history.csv').read_text().splitlines()[0].startswith('epoch,train_loss')
    assert len((tmp_path/'history.csv').read_text().splitlines()) == 1 + 3      # 3 epochs of 2 steps
    assert _bin_run(tmp_path, fp='other inputs').resumed_from_step == 0             # a checkpoint of other inputs is not resumed
    assert len(StepDraws(3, 6, 8)) == 48


CLS = ClsConfig(iters=30, bs=8, lr=.05, milestones=(30,), resize=48, crop=40, scale_range=(.8, 1.2), test_crops=2, fc_dim=32, dropout=0.)


def test_classification_learns_colours(toy_voc, alexnet):
    "40 steps on 8 images of 3 colour-coded classes: test mAP over the 3 defined classes well above chance."
    r = voc07_classification(alexnet, toy_voc[0], CLS, seed=0)
    assert r['n_defined'] == 3 and r['n_test'] == 4 and len(r['undefined']) == 17
    assert r['map_allpt'] > .7, r
    assert set(r['seconds']) == {'total', 'train', 'test', 'cpu'}
    r2 = voc07_classification(alexnet, toy_voc[0], dataclasses.replace(CLS, n_test=2), seed=0)
    assert r2['n_test'] == 2


def test_segmentation_runs_and_scores(toy_voc, alexnet):
    "80 steps on 8 images with one colour-coded object each: the objects are segmented (not only the background)."
    cfg = SegConfig(iters=80, bs=4, iter_size=1, lr=.05, milestones=(60,), crop=48, scale_range=(.9, 1.1), head='light', head_dim=32, dropout=0.)
    r = voc12_segmentation(alexnet, toy_voc[1], cfg, seed=0)
    assert r['n_test'] == 4 and r['n_defined'] >= 4                               # bg + the 3 classes present in val
    assert r['miou'] > .4 and min(r['iou'][c] for c in ('aeroplane', 'bicycle', 'bird')) > .2, r['iou']


def test_detection_single_and_multi_scale(toy_voc, alexnet):
    cfg = dataclasses.replace(TRANSFER_PRESETS['test'].det, iters=3, min_size=48, max_size=64, ms_scales=(40, 48))
    for ms in (False, True):
        r = voc07_detection(alexnet, toy_voc[0], cfg, multi_scale=ms, seed=0)
        assert r['protocol'].endswith('ms' if ms else 'ss') and r['n_test'] == 4 and r['n_defined'] == 3
        assert 0 <= r['map_11pt'] <= 1 and r['n_dets'] <= 4 * cfg.max_dets
        assert r['scales'] == ([40, 48] if ms else [48])


def test_transfer_student_caches_and_tables(toy_voc, alexnet, tmp_path):
    ck = save_alexnet(alexnet, tmp_path/'student'/'cc_hog_k8'/'final.pth')
    save_alexnet(alexnet, tmp_path/'student'/'random'/'final.pth')
    cfg = TransferConfig(cls=dataclasses.replace(CLS, iters=3), ckpt_every=0)
    res = transfer_student('cc_hog_k8', ck, cfg, toy_voc[0], None, tmp_path, ('cls', 'seg'), 'custom', 0)
    assert list(res) == ['cls']                                                 # no VOC12 given: seg skipped
    f = tmp_path/'transfer'/'cc_hog_k8'/'cls.json'; mtime = f.stat().st_mtime_ns
    res2 = transfer_student('cc_hog_k8', ck, cfg, toy_voc[0], None, tmp_path, ('cls',), 'custom', 0)
    assert f.stat().st_mtime_ns == mtime and res2['cls']['map_11pt'] == res['cls']['map_11pt']
    run_dir = next((tmp_path/'transfer'/'cc_hog_k8').glob('cls-*'))
    assert sorted(f.name for f in run_dir.iterdir()) == ['history.csv']         # checkpoints removed once the result is stored
    from kt_paper.train import precision_policy
    assert res['cls']['curve'] == str(run_dir/'history.csv') and res['cls']['precision'] == precision_policy(torch.device('cpu')).name
    rows = transfer_rows({'cc_hog_k8': res})
    assert rows[0]['model'] == 'CC+hog_k8' and rows[0]['det_ss_map'] is None
    md = write_transfer_table(rows, TRANSFER_COLUMNS, tmp_path/'fig'/'transfer_voc', 'caption')
    assert '| CC+hog_k8 |' in md and (tmp_path/'fig'/'transfer_voc.csv').read_text().startswith('model,cls_map,')
    assert list(find_students(tmp_path/'student')) == ['cc_hog_k8', 'random']
    ks, dom = ablation_students(find_students(tmp_path/'student'))
    assert list(ks) == [('hog', 8)] and dom == {}
    assert k_ablation_rows({'cc_hog_k8': res})[0]['k'] == 8
    assert domain_ablation_rows({'cc_jigsaw_objects-scenes': res})[0]['labelled'] == 'scenes'
    assert 'seed 0' in describe_setup(cfg, 'custom', 0, {'x': res}) and student_label('jigsaw_direct') == 'Jigsaw++ (direct)'


def test_stored_results_follow_the_code(toy_voc, alexnet, tmp_path, monkeypatch):
    "A stored result is read back only while its protocol's code digest is the same (kt_paper.transfer for cls/det, kt_paper.segmentation for seg)."
    import kt_paper.transfer as T
    cfg = TransferConfig(cls=dataclasses.replace(CLS, iters=1), ckpt_every=0)
    run = lambda: transfer_student('s', alexnet, cfg, toy_voc[0], None, tmp_path, ('cls',), 'custom', 0)['cls']
    a = run(); f = tmp_path/'transfer'/'s'/'cls.json'; mtime = f.stat().st_mtime_ns
    assert run()['key'] == a['key'] and f.stat().st_mtime_ns == mtime             # same code: read back
    asked = []
    monkeypatch.setattr(T, 'code_key', lambda m: asked.append(m) or f'edited {m}')  # as if kt_paper/transfer.py had changed
    b = run()
    assert b['key'] != a['key'] and f.stat().st_mtime_ns != mtime and 'kt_paper.transfer' in asked
    asked.clear()
    seg = dataclasses.replace(cfg, seg=SegConfig(iters=1, bs=2, iter_size=1, lr=1e-2, milestones=(1,), crop=48, head='light', head_dim=8, n_test=1))
    transfer_student('s', alexnet, seg, None, toy_voc[1], tmp_path, ('seg',), 'custom', 0)
    assert asked[0] == 'kt_paper.segmentation'


@pytest.mark.skipif(not MINI.exists(), reason=f'real VOC sample not found at {MINI}')
def test_real_voc2007_mini_smoke(alexnet):
    "Classification and detection run on the 100 genuine VOC2007 images; AP is undefined exactly for the 4 absent classes."
    ims = read_voc_split(MINI, 'test')
    assert len(ims) == 36
    cfg = dataclasses.replace(CLS, iters=2, bs=4)
    r = voc07_classification(alexnet, MINI, cfg, seed=0)
    assert sorted(r['undefined']) == ['cat', 'diningtable', 'pottedplant', 'tvmonitor'] and r['n_defined'] == 16
    assert 0 < r['map_11pt'] < 1
    det = dataclasses.replace(TRANSFER_PRESETS['test'].det, iters=1)
    rd = voc07_detection(alexnet, MINI, det, seed=0)
    assert rd['n_test'] == 36 and rd['n_defined'] == 16 and 0 <= rd['map_11pt'] <= 1


def test_bf16_classification_and_detection(toy_voc, alexnet):
    "The bf16 + channels-last path (forced, whatever this CPU has) trains and scores; the policy is recorded."
    r = voc07_classification(alexnet, toy_voc[0], dataclasses.replace(CLS, iters=3), seed=0, precision='bf16')
    assert r['precision'] == 'bf16' and 0 <= r['map_11pt'] <= 1 and np.isfinite(r['final_loss'])
    cfg = dataclasses.replace(TRANSFER_PRESETS['test'].det, iters=2, min_size=48, max_size=64)
    rd = voc07_detection(alexnet, toy_voc[0], cfg, seed=0, precision='bf16')
    assert rd['precision'] == 'bf16' and 0 <= rd['map_11pt'] <= 1


def test_run_transfer_stage(tmp_path):
    "The stage at the test preset: main students on the three protocols, an ablation student on classification, the tables."
    torch.manual_seed(0)
    net = build_alexnet(20, **STUDENT_PRESETS['test'].alexnet_args())
    for n in ('random', 'cc_hog_k8'): save_alexnet(net, tmp_path/'student'/n/'final.pth')
    res = run_transfer(tmp_path, 'test', seed=0, device='cpu', smoke=False, multi_scale_det=False)
    assert list(res['students']) == ['random'] and set(res['students']['random']) == {'cls', 'det_ss', 'seg'}
    assert list(res['ablation']) == ['cc_hog_k8'] and list(res['ablation']['cc_hog_k8']) == ['cls']
    for f in ('random/cls.json', 'random/det_ss.json', 'random/seg.json', 'cc_hog_k8/cls.json'): assert (tmp_path/'transfer'/f).exists()
    for f in ('transfer_voc.md', 'transfer_voc.csv', 'ablation_k.md', 'ablation_k.csv'): assert (tmp_path/'figures'/f).exists()
    assert not (tmp_path/'figures'/'ablation_domain.md').exists() and res['tables']['ablation_domain'] is None
    assert '| Random |' in res['tables']['transfer_voc'] and 'Preset `test`, seed 0' in res['tables']['transfer_voc']
    f = tmp_path/'transfer'/'random'/'seg.json'; mtime = f.stat().st_mtime_ns
    again = run_transfer(tmp_path, 'test', seed=0, device='cpu', smoke=False, multi_scale_det=False)   # read back, not retrained
    assert f.stat().st_mtime_ns == mtime and again['students']['random']['seg']['miou'] == res['students']['random']['seg']['miou']
    with pytest.raises(TypeError, match='no field'): run_transfer(tmp_path, 'test', device='cpu', nosuch=1)


def test_classification_reference_protocol_is_the_paper_default():
    "Krähenbühl et al.'s code: stored image = scale 1, test views drawn with the training transform and raw outputs summed, non-interpolated AP."
    from kt_paper.transfer import cls_view, predict_classification
    from kt_paper.images import imagenet_normalize
    p, s = TRANSFER_PRESETS['paper'].cls, TRANSFER_PRESETS['small'].cls
    assert (p.native_scale, p.test_views, p.metric) == (True, 'train', 'non-interpolated')
    assert (s.native_scale, s.test_views, s.metric) == (False, 'scale1', '11-point')
    img = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    cfg = dataclasses.replace(p, crop=40)
    v = cls_view(img, cfg, torch.Generator().manual_seed(0), train=False)     # scale 1 = the image as stored: a window of it
    x = imagenet_normalize(img)
    hits = [(i, j, f) for i in range(11) for j in range(21) for f in (0, 1)
            if torch.allclose((x[..., i:i+40, j:j+40].flip(-1) if f else x[..., i:i+40, j:j+40]), v)]
    assert len(hits) == 1
    class Const(torch.nn.Module):                                              # raw outputs 2 everywhere
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, x): return torch.full((len(x), 20), 2.) + self.w
    store = [img, img]                                                         # any sequence of uint8 images
    ref = predict_classification(Const(), store, dataclasses.replace(cfg, test_crops=3))
    old = predict_classification(Const(), store, dataclasses.replace(cfg, test_crops=3, test_views='scale1', native_scale=False, resize=48))
    np.testing.assert_allclose(ref, 6.); np.testing.assert_allclose(old, torch.sigmoid(torch.tensor(2.)).item(), rtol=1e-6)
    with pytest.raises(ValueError, match='test_views'): predict_classification(Const(), store, dataclasses.replace(cfg, test_views='x'))


def test_classification_result_reports_the_configured_metric(toy_voc, alexnet):
    cfg = dataclasses.replace(CLS, iters=2, metric='non-interpolated')
    r = voc07_classification(alexnet, toy_voc[0], cfg, seed=0)
    assert r['metric'] == 'non-interpolated' and r['map'] == r['map_noninterp'] and r['map_noninterp'] <= r['map_allpt'] + 1e-12
    from kt_paper.report import cls_map
    assert cls_map(r) == r['map'] and cls_map({'map_11pt': .5, 'map_allpt': .6}, False) == .6


def test_segmentation_splits_follow_the_fcn_reference_when_present(toy_voc, tmp_path):
    "'auto' splits: SBD train beside the VOCdevkit and seg11valid when present, else VOC12 train and val."
    import shutil
    from scipy.io import savemat
    from kt_paper.segmentation import seg_splits
    v12 = toy_voc[1]
    assert seg_splits(v12, SegConfig()) == ('train', 'val')
    root = tmp_path/'copy'; shutil.copytree(Path(v12).parents[1], root)
    voc = root/'VOCdevkit'/'VOC2012'; sbd = root/'SBD'/'dataset'; (sbd/'img').mkdir(parents=True); (sbd/'cls').mkdir()
    ids = sorted(p.stem for p in (voc/'JPEGImages').iterdir())[:3]
    for i in ids:
        shutil.copy(voc/'JPEGImages'/f'{i}.jpg', sbd/'img'/f'{i}.jpg')
        savemat(sbd/'cls'/f'{i}.mat', {'GTcls': {'Segmentation': np.array(Image.open(voc/'SegmentationClass'/f'{i}.png'))}})
    (sbd/'train.txt').write_text('\n'.join(ids) + '\n')
    (voc/'ImageSets'/'Segmentation'/'seg11valid.txt').write_text('\n'.join(sorted(p.stem for p in (voc/'SegmentationClass').iterdir())[-2:]) + '\n')
    assert seg_splits(voc, SegConfig()) == ('sbd_train', 'seg11valid')
    assert seg_splits(voc, SegConfig(train_split='train', test_split='val')) == ('train', 'val')
    r = voc12_segmentation(build_alexnet(20, width=.125, bn=True, conv1_stride=2, input_size=48), voc,
                           SegConfig(iters=2, bs=2, iter_size=1, lr=1e-2, milestones=(1,), crop=48, head='light', head_dim=16), seed=0)
    assert (r['train_split'], r['test_split'], r['n_train'], r['n_test']) == ('sbd_train', 'seg11valid', 3, 2)


def _old_predict_classification(model, store, cfg, seed=0, bs=64):
    "The all-views-at-once scores (the code before streaming), as the reference."
    from kt_paper.transfer import cls_views, cls_window
    from kt_paper.finetune import resize_short
    from kt_paper.images import imagenet_normalize
    out = []
    for i in range(len(store)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7 + i)
        if cfg.test_views == 'train': out.append(cls_views([cls_window(store[i], cfg, g) for _ in range(cfg.test_crops)], cfg.crop))
        else: out.append(torch.stack([random_crop_flip(resize_short(store[i], cfg.resize), cfg.crop, g, prep=imagenet_normalize)
                                      for _ in range(cfg.test_crops)]))
    views = torch.cat(out)
    with torch.no_grad(): z = torch.cat([model.eval()(views[k:k+bs]) for k in range(0, len(views), bs)]).view(len(store), cfg.test_crops, -1)
    return (z.sum(1) if cfg.test_views == 'train' else torch.sigmoid(z).mean(1)).numpy()


@pytest.mark.parametrize('views', ['train', 'scale1'])
def test_classification_test_views_stream_in_bounded_batches(views):
    "Same scores as all views at once, whatever `bs`; no batch over `bs` views, and images read only as their batch needs them."
    from kt_paper.transfer import predict_classification
    class Reads(list):
        def __init__(self, xs): super().__init__(xs); self.n = 0
        def __getitem__(self, i): self.n = max(self.n, i + 1); return super().__getitem__(i)   # images read so far
    class Net(torch.nn.Module):
        def __init__(self, store):
            super().__init__(); torch.manual_seed(0); self.store, self.seen = store, []
            self.f = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 20))
        def forward(self, x): self.seen.append((len(x), self.store.n)); return self.f(x)
    g = torch.Generator().manual_seed(0)
    store = Reads([torch.randint(0, 256, (3, 30 + 5*n, 40 - 3*n), dtype=torch.uint8, generator=g) for n in range(7)])
    cfg = dataclasses.replace(CLS, crop=24, test_crops=3, test_views=views, resize=28)
    net = Net(store); ref = _old_predict_classification(net, store, cfg, bs=1000)
    for bs in (4, 5, 21, 64):
        store.n, net.seen = 0, []
        np.testing.assert_allclose(predict_classification(net, store, cfg, bs=bs, precision='fp32'), ref, rtol=1e-5, atol=1e-6)
        assert all(b <= bs for b, _ in net.seen) and sum(b for b, _ in net.seen) == 7 * 3
        assert all(reads <= -(-(k + 1) * bs // 3) for k, (_, reads) in enumerate(net.seen)), (bs, net.seen)   # images for k+1 batches


def test_detector_box_coordinates_stay_float32_under_bf16(alexnet):
    "Under bf16 autocast the detector's anchors, decoded boxes (RPN and RoI heads), regression targets and detections equal float32 arithmetic to < 0.01 px."
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from kt_paper.transfer import build_detector
    cfg = dataclasses.replace(TRANSFER_PRESETS['test'].det, anchor_sizes=(64, 128, 256), min_size=480, max_size=640, score_thresh=0.)
    det = build_detector(alexnet, cfg).eval()
    il, fm = ImageList(torch.zeros(1, 3, 480, 640), [(480, 640)]), torch.zeros(1, 8, 30, 40, dtype=torch.bfloat16)
    ref_anchors = AnchorGenerator(((64, 128, 256),), ((0.5, 1., 2.),))(il, [fm.float()])[0]
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 2, generator=g) * 100 + 300; boxes = torch.cat([boxes, boxes + 80 + torch.rand(50, 2, generator=g) * 120], 1)
    codes = (torch.randn(50, 4, generator=g) / 10).bfloat16()                  # what a bf16 network regresses
    with torch.autocast('cpu', torch.bfloat16):
        anchors = det.rpn.anchor_generator(il, [fm])[0]
        for coder in (det.rpn.box_coder, det.roi_heads.box_coder):
            ref = BoxCoder(coder.weights, coder.bbox_xform_clip).decode(codes.float(), [boxes])
            dec = coder.decode(codes, [boxes])
            assert dec.dtype == torch.float32 and (dec - ref).abs().max() < .01
            back = coder.encode([dec.view(-1, 4)], [boxes])[0]                 # regression targets of those boxes
            assert (back - codes.float()).abs().max() < 1e-3
        out = det([torch.rand(3, 480, 640, generator=g)])[0]
    assert anchors.dtype == torch.float32 and (anchors - ref_anchors).abs().max() < .01
    assert len(out['boxes']) and out['boxes'].dtype == torch.float32
    assert det.rpn.anchor_generator.cell_anchors[0].dtype == torch.float32      # not left rounded for later fp32 calls

"Tests of kt_paper.segmentation: splits without a train/test leak (SBD beside VOC2012), the reference FCN-32s head (geometry, crop, upsampling), whole-image training with gradient accumulation, the Caffe bias multipliers."
import dataclasses, math
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from kt_paper.nets import build_alexnet
from kt_paper.finetune import conv_trunk, train_steps
from kt_paper.segmentation import (SegConfig, FCN32, LightFCN, build_fcn, fcn_geometry, bilinear_kernel, seg_splits,
                                   drop_test_images, SegDraws, seg_loss, voc12_segmentation, read_mask)

torch.set_num_threads(1)
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]


def _write_pair(img_path:Path, mask_path:Path, n:int, rng):
    "A 64x48 image with one box of colour n % 3 on grey, and its mask (class n % 3 + 1, its top row 255); `.mat` masks in SBD's layout."
    c = n % 3
    x0, y0 = int(rng.integers(1, 30)), int(rng.integers(1, 20)); x1, y1 = x0 + 25, y0 + 20
    img = np.full((48, 64, 3), 90, np.uint8); img[y0-1:y1, x0-1:x1] = COLOURS[c]
    mask = np.zeros((48, 64), np.uint8); mask[y0-1:y1, x0-1:x1] = c + 1; mask[y0-1, x0-1:x1] = 255
    Image.fromarray(img).save(img_path, quality=95)
    if mask_path.suffix == '.mat':
        from scipy.io import savemat
        savemat(mask_path, {'GTcls': {'Segmentation': mask}})
    else:
        p = Image.fromarray(mask, 'P'); p.putpalette([0, 0, 0] * 256); p.save(mask_path)


@pytest.fixture
def voc12_sbd(tmp_path):
    """VOCdevkit/VOC2012 (train: 6 images, val: 4) and SBD/dataset beside it, as `data.find_sbd` finds it, whose train set
    holds 3 of the VOC train images, 2 of the VOC val images and 2 images of its own; no `seg11valid.txt`."""
    rng = np.random.default_rng(0)
    voc = tmp_path/'VOCdevkit'/'VOC2012'; sbd = tmp_path/'SBD'/'dataset'
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (voc/d).mkdir(parents=True)
    for d in ('img', 'cls'): (sbd/d).mkdir(parents=True)
    ids = [f'2008_{i:06d}' for i in range(1, 11)]
    for n, i in enumerate(ids): _write_pair(voc/'JPEGImages'/f'{i}.jpg', voc/'SegmentationClass'/f'{i}.png', n, rng)
    train, val = ids[:6], ids[6:]
    (voc/'ImageSets'/'Segmentation'/'train.txt').write_text('\n'.join(train) + '\n')
    (voc/'ImageSets'/'Segmentation'/'val.txt').write_text('\n'.join(val) + '\n')
    sbd_train = train[:3] + val[:2] + ['2011_000001', '2011_000002']
    for n, i in enumerate(sbd_train): _write_pair(sbd/'img'/f'{i}.jpg', sbd/'cls'/f'{i}.mat', n, rng)
    (sbd/'train.txt').write_text('\n'.join(sbd_train) + '\n')
    return voc, sbd_train, val


@pytest.fixture(scope='module')
def student():
    torch.manual_seed(0)
    return build_alexnet(20, width=.125, bn=True, conv1_stride=2, input_size=48)


FAST = SegConfig(iters=2, bs=2, iter_size=1, lr=1e-2, milestones=(1,), crop=48, head='light', head_dim=16)


def test_sbd_train_leaves_out_the_test_images(voc12_sbd, student, capsys):
    "SBD beside VOC2012, no seg11valid: 'auto' trains on SBD train and tests on VOC12 val, without the 2 val images SBD train holds."
    voc, sbd_train, val = voc12_sbd
    assert seg_splits(voc, SegConfig()) == ('sbd_train', 'val')
    r = voc12_segmentation(student, voc, FAST, seed=0)
    assert (r['train_split'], r['test_split'], r['n_test']) == ('sbd_train', 'val', 4)
    assert (r['n_train'], r['excluded_from_train']) == (len(sbd_train) - 2, 2)
    assert 'train on sbd_train (5 images; 2 more are in val and were left out), test on val (4 images)' in capsys.readouterr().out


def test_seg11valid_needs_no_exclusion(voc12_sbd, student):
    "With the FCN authors' seg11valid (none of its images in SBD train) nothing is left out."
    voc, sbd_train, val = voc12_sbd
    (voc/'ImageSets'/'Segmentation'/'seg11valid.txt').write_text('\n'.join(val[2:]) + '\n')
    r = voc12_segmentation(student, voc, FAST, seed=0)
    assert (r['train_split'], r['test_split'], r['n_train'], r['n_test'], r['excluded_from_train']) == ('sbd_train', 'seg11valid', 7, 2, 0)


def test_drop_test_images_by_id():
    tr = [(Path(f'SBD/img/{i}.jpg'), Path(f'SBD/cls/{i}.mat')) for i in ('a', 'b', 'c')]
    te = [(Path(f'VOC/JPEGImages/{i}.jpg'), Path(f'VOC/SegmentationClass/{i}.png')) for i in ('c', 'd')]
    assert drop_test_images(tr, te) == (tr[:2], 1) and drop_test_images(tr, []) == (tr, 0)


def test_reference_head_geometry_is_fcn_alexnets():
    "The paper's AlexNet: stride 32, crop offset 18 (the FCN-AlexNet prototxt's), a 63-tap fixed bilinear kernel; any input size comes back."
    net = build_alexnet(20, width=.125)
    fcn = FCN32(conv_trunk(net), 21, head_dim=8)
    assert (fcn.stride, fcn.offset, tuple(fcn.up.shape), fcn.head.fc6.kernel_size) == (32, 18, (21, 1, 63, 63), (6, 6))
    assert fcn.trunk.conv1.conv.padding == (100, 100) and net.features.conv1.conv.padding == (0, 0)
    assert 'pool5' in dict(fcn.trunk.named_children())
    for h, w in [(1, 1), (31, 500), (500, 375), (227, 33)]:
        assert fcn(torch.zeros(1, 3, h, w)).shape == (1, 21, h, w)
    assert not any(p is fcn.up for p in fcn.parameters())
    # conv 11/4 pad 100: centre 4u + 5 - 100; then a 3/2 pool: 4(2v + 1) - 95 = 8v - 91
    assert fcn_geometry(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 11, 4, 100), torch.nn.MaxPool2d(3, 2)), 1) == (8, -91.)
    k = bilinear_kernel(1, 32)[0, 0]; w = k[31]                           # the centre row: the 1-d kernel (its peak is 1)
    assert k.shape == (63, 63) and torch.equal(k, w[:, None] * w[None])
    assert w[31] == 1 and torch.allclose(w[:31] + w[32:], torch.ones(31))  # two neighbours' weights add up to 1: bilinear


def test_reference_head_scores_are_aligned():
    "A bright pixel on the trunk's sampling grid comes back at its own position after upsampling and crop."
    from collections import OrderedDict
    fcn = FCN32(torch.nn.Sequential(OrderedDict(conv1=torch.nn.Conv2d(3, 1, 1, stride=16))), 1, 1, fc6_kernel=1, conv1_pad=5, dropout=0.)
    with torch.no_grad():
        for m in (fcn.trunk.conv1, fcn.head.fc6, fcn.head.fc7, fcn.head.score): m.weight.fill_(1.); m.bias.zero_()
    for y0, x0 in [(11, 27), (43, 59), (27, 11)]:                       # (y0 + 5) and (x0 + 5) divide by 16
        x = torch.zeros(1, 3, 60, 70); x[0, 1, y0, x0] = 1.
        with torch.no_grad(): y = fcn.eval()(x)[0, 0]
        assert divmod(int(y.argmax()), 70) == (y0, x0) and float(y.max()) == pytest.approx(1.)


def test_build_fcn_heads(student):
    ref, light = build_fcn(student, SegConfig(head_dim=8, conv1_pad=30)), build_fcn(student, SegConfig(head='light', head_dim=8))
    assert isinstance(ref, FCN32) and isinstance(light, LightFCN)
    assert ref.head.fc6.kernel_size == student.pool5_shape[1:] and ref.stride == 16
    assert 'pool5' not in dict(light.trunk.named_children())
    with pytest.raises(ValueError, match='pad at least'): build_fcn(student, SegConfig(head_dim=8, conv1_pad=5))


def test_reference_protocol_defaults():
    c = SegConfig()
    assert (c.head, c.bs, c.iter_size, c.crop, c.lr, c.momentum, c.wd, c.conv1_pad) == ('reference', 1, 20, None, 1e-4, .9, 5e-4, 100)
    assert (c.bias_lr_mult, c.bias_decay_mult, c.iters, c.milestones) == (2., 0., 150_000, (50_000, 100_000))


def test_whole_images_accumulate_and_biases_have_their_own_group(voc12_sbd, student):
    "Whole images at batch 1, iter_size 3: 3 draws per step; biases at lr x2 and without weight decay."
    from kt_paper.finetune import ImageStore, read_voc_seg_split
    voc = voc12_sbd[0]
    pairs = read_voc_seg_split(voc, 'train')
    cfg = SegConfig(iters=2, iter_size=3, lr=1e-2, milestones=(5,), head_dim=8, conv1_pad=30)
    store, masks = ImageStore([p for p, _ in pairs]), [read_mask(m) for _, m in pairs]
    draws = SegDraws(store, masks, cfg, seed=0)
    assert len(draws) == 2 * 3 and draws[0][0].shape == (3, 48, 64)       # whole 64x48 images
    from fastai.callback.core import Callback
    seen = []
    class Shapes(Callback):
        def after_batch(self): seen.append(tuple(self.xb[0].shape))
    learn = train_steps(build_fcn(student, cfg), draws, cfg, seg_loss, precision='fp32', cbs=[Shapes()])
    assert seen == [(1, 3, 48, 64)] * 6                                    # 6 batches of one image: 2 steps of 3
    lrs, wds = [h['lr'] for h in learn.opt.hypers], [h['wd'] for h in learn.opt.hypers]
    assert lrs == pytest.approx([2e-2, 1e-2]) and wds == pytest.approx([0., 5e-4])
    assert all(n.endswith('bias') for n, p in learn.model.named_parameters() if any(p is q for q in learn.opt.param_lists[0]))


def test_reference_head_learns_the_objects(voc12_sbd, student):
    "Whole-image training of the reference head (batch 1, iter_size 2) on 6 images of one coloured box each: the boxes of the 4 val images are segmented."
    cfg = SegConfig(iters=100, iter_size=2, lr=4e-2, milestones=(80,), head_dim=32, conv1_pad=30, dropout=0., train_split='train')
    r = voc12_segmentation(student, voc12_sbd[0], cfg, seed=0)
    assert (r['n_train'], r['n_test'], r['head'], r['crop']) == (6, 4, 'reference', None)
    assert r['miou'] > .5 and min(r['iou'][c] for c in ('aeroplane', 'bicycle', 'bird')) > .3, r['iou']   # fp32: .75, min .52; bf16: .66, min .48

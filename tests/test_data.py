"""Tests of kt_paper.data: image decoding, the built-in generator, readers (incl. bad input), loaders, real samples."""
import hashlib, multiprocessing as mp, os, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kt_paper import data as D
from kt_paper.data import (VOC_CLASSES, AnnotationError, DataError, ImageReadError, load_rgb, load_mask, make_builtin_dataset,
                           ensure_builtin_dataset, read_class_folder, read_unlabeled, read_tiny_imagenet, read_image_set,
                           parse_voc_xml, read_voc, read_voc_class_files, read_voc_segmentation, voc_class_labels, voc_target,
                           verify_images)

SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', Path(__file__).resolve().parents[1].parent/'shared'/'data'))
TINY = dict(n_objects_train=1, n_objects_val=1, n_scenes_train=1, n_scenes_val=1,
            n_voc07_trainval=4, n_voc07_test=4, n_voc12_train=2, n_voc12_val=2)


@pytest.fixture(scope='module')
def builtin(tmp_path_factory):
    "The test-scale built-in dataset, generated once for this module."
    return ensure_builtin_dataset(tmp_path_factory.mktemp('b')/'builtin', seed=0, scale='test', n_workers=0)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob('*')):
        if p.is_file(): h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- load_rgb
@pytest.mark.parametrize('mode,val', [('L', 90), ('CMYK', (0, 0, 0, 0)), ('P', 5), ('RGBA', (10, 20, 30, 255)),
                                      ('LA', (90, 255)), ('I;16', 40000), ('1', 1)])
def test_load_rgb_modes(tmp_path, mode, val):
    f = tmp_path/('x.jpg' if mode == 'CMYK' else 'x.png')
    Image.new(mode, (5, 4), val).save(f)
    im = load_rgb(f)
    assert im.mode == 'RGB' and im.size == (5, 4)


def test_load_rgb_transparent_on_white_and_exif(tmp_path):
    Image.new('RGBA', (4, 4), (0, 0, 255, 0)).save(tmp_path/'t.png')
    assert load_rgb(tmp_path/'t.png').getpixel((1, 1)) == (255, 255, 255)
    im = Image.new('RGB', (10, 4), 'white'); im.paste((0, 0, 0), (0, 0, 3, 4))
    ex = Image.Exif(); ex[0x0112] = 8                      # rotate 90 counter-clockwise to view
    im.save(tmp_path/'e.jpg', exif=ex.tobytes(), quality=95)
    up = load_rgb(tmp_path/'e.jpg')
    assert up.size == (4, 10) and sum(up.getpixel((1, 9))) < 100      # the black left stripe is now at the bottom


def test_load_rgb_bad_files(tmp_path):
    Image.new('RGB', (64, 64), 'red').save(tmp_path/'ok.jpg', quality=90)
    b = (tmp_path/'ok.jpg').read_bytes()
    (tmp_path/'trunc.jpg').write_bytes(b[:len(b)*2//3])
    (tmp_path/'garbage.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0'*50)
    for name in ('trunc.jpg', 'garbage.png', 'absent.jpg'):
        with pytest.raises(ImageReadError, match=name): load_rgb(tmp_path/name)
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_and_worker_independent(tmp_path):
    a = make_builtin_dataset(tmp_path/'a', seed=1, **TINY, n_workers=0)
    b = make_builtin_dataset(tmp_path/'b', seed=1, **TINY, n_workers=2)
    assert _digest(a) == _digest(b)
    r = lambda s: np.asarray(D.render_voc_image(np.random.default_rng([s, 4, 0]))[0])
    assert np.array_equal(r(1), r(1)) and not (r(1).shape == r(2).shape and np.array_equal(r(1), r(2)))


def test_generator_refuses_nonempty(tmp_path):
    (tmp_path/'x').mkdir(); (tmp_path/'x'/'f').write_text('1')
    with pytest.raises(DataError, match='not empty'): make_builtin_dataset(tmp_path/'x', **TINY)


def _ensure(root): return str(ensure_builtin_dataset(root, seed=0, scale='test', n_workers=0))


def test_ensure_is_safe_in_parallel(tmp_path, monkeypatch):
    monkeypatch.setitem(D.BUILTIN_SCALES, 'test', dict(size=96, **TINY))    # smaller; the forked workers inherit it
    root = tmp_path/'shared'
    with mp.get_context('fork').Pool(2) as pool: res = pool.map(_ensure, [root, root])
    assert res == [str(root)]*2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith('.lock')) == ['shared']   # no temp dirs left
    assert D.load_json(root/'builtin.json')['version'] == D.BUILTIN_VERSION


def test_ensure_refuses_other_settings_and_versions(builtin, tmp_path):
    with pytest.raises(DataError, match='other settings'): ensure_builtin_dataset(builtin, seed=1, scale='test')
    with pytest.raises(ValueError, match='unknown scale'): ensure_builtin_dataset(builtin, scale='huge')
    old = tmp_path/'old'; old.mkdir(); D.save_json(dict(version=0, args={}), old/'builtin.json')
    with pytest.raises(DataError, match='generator version 0'): ensure_builtin_dataset(old, scale='test')


def test_builtin_layout(builtin):
    counts = D.load_json(builtin/'builtin.json')['counts']
    s = D.BUILTIN_SCALES['test']
    assert counts['objects'] == 20*(s['n_objects_train'] + s['n_objects_val'])
    assert counts['scenes'] == len(D.SCENE_CLASSES)*(s['n_scenes_train'] + s['n_scenes_val'])
    for split in ('train', 'val'):
        assert sorted(p.name for p in (builtin/'objects'/split).iterdir()) == list(VOC_CLASSES)
    v07 = builtin/'VOCdevkit'/'VOC2007'
    for f in ('train', 'val', 'trainval', 'test', 'dog_test', 'person_trainval'): assert (v07/'ImageSets'/'Main'/f'{f}.txt').is_file()
    tv, tr, va = (set((v07/'ImageSets'/'Main'/f'{f}.txt').read_text().split()) for f in ('trainval', 'train', 'val'))
    assert tr | va == tv and not tr & va
    assert len(read_voc_segmentation(builtin, 'train').ids) == s['n_voc12_train']
    im = Image.open(builtin/'objects'/'train'/'cat'/'cat_00000.JPEG'); assert im.size == (96, 96)


def test_builtin_voc_annotations_are_consistent(builtin):
    vs = read_voc(builtin, 'trainval')
    ids, lab = read_voc_class_files(builtin, 'trainval')
    assert ids == vs.ids and (lab == vs.labels).all()
    for a, p in zip(vs.annotations, vs.paths):
        w, h = Image.open(p).size
        assert (a.width, a.height) == (w, h) and 1 <= len(a.objects) <= 4
        for o in a.objects:
            x0, y0, x1, y1 = o.box
            assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h
    line = (builtin/'VOCdevkit'/'VOC2007'/'ImageSets'/'Main'/'person_trainval.txt').read_text().splitlines()[0]
    assert len(line.split()) == 2 and line[6:8] in ('  ', ' -')      # devkit format '%s %2d'


def test_builtin_masks_match_boxes(builtin):
    seg = read_voc_segmentation(builtin, 'train')
    vs = read_voc(builtin, 'train', year='2012')
    anns = dict(zip(vs.ids, vs.annotations))
    for i, mp_ in zip(seg.ids, seg.masks):
        m = load_mask(mp_)
        assert Image.open(mp_).mode == 'P'
        present = set(np.unique(m).tolist()) - {0, 255}
        assert present <= {VOC_CLASSES.index(o.name) + 1 for o in anns[i].objects}
        assert (m == 255).any()                                     # boundaries are void


# ---------------------------------------------------------------- readers on bad input
def test_class_folder_errors(builtin, tmp_path):
    t = tmp_path/'t'; shutil.copytree(builtin/'scenes'/'train', t/'train')
    s = read_class_folder(t, 'train'); assert s.classes == D.SCENE_CLASSES and len(s) == 10*4
    for p in (t/'train'/'lake').iterdir(): p.unlink()
    with pytest.raises(DataError, match=r'lake: class folder contains no images'): read_class_folder(t, 'train')
    with pytest.warns(UserWarning, match='skipped 1 of'): s = read_class_folder(t, 'train', on_error='skip')
    assert len(s) == 36 and 'lake' in s.skipped[0] and s.classes == D.SCENE_CLASSES
    with pytest.raises(DataError, match='split folder not found'): read_class_folder(t, 'val')
    with pytest.raises(DataError, match='dataset folder not found'): read_class_folder(tmp_path/'nope', 'train')
    with pytest.raises(ValueError, match='on_error'): read_class_folder(t, 'train', on_error='ignore')
    assert len(read_unlabeled(t)) == 36


def test_voc_bad_input(builtin, tmp_path):
    v = tmp_path/'VOC2007'; shutil.copytree(builtin/'VOCdevkit'/'VOC2007', v)
    ids = read_voc(v, 'test').ids
    (v/'JPEGImages'/f'{ids[0]}.jpg').unlink()
    (v/'Annotations'/f'{ids[1]}.xml').write_text('<annotation><size><width>3</width>')
    with pytest.raises(ImageReadError, match=rf'{ids[0]}\.jpg: listed in .*test\.txt but missing'): read_voc(v, 'test')
    with pytest.warns(UserWarning, match='skipped 2 of'): vs = read_voc(v, 'test', on_error='skip')
    assert len(vs) == len(ids) - 2 and any('malformed XML' in s for s in vs.skipped)
    with pytest.raises(AnnotationError, match=rf'{ids[1]}\.xml: malformed XML'): parse_voc_xml(v/'Annotations'/f'{ids[1]}.xml')
    x = (v/'Annotations'/f'{ids[2]}.xml'); x.write_text(x.read_text().replace('<xmin>', '<xmin>abc', 1))
    with pytest.raises(AnnotationError, match='is not a number'): parse_voc_xml(x)
    with pytest.raises(AnnotationError, match='split file not found'): read_voc(v, 'nosuch')
    with pytest.raises(DataError, match='not a VOC2007 folder'): read_voc(v/'JPEGImages')
    img = v/'JPEGImages'/f'{ids[3]}.jpg'; img.write_bytes(img.read_bytes()[:200])
    with pytest.warns(UserWarning): ok = verify_images(vs, on_error='skip')
    assert len(ok) == len(vs) - 1 and img.name in ok.skipped[-1]


def test_voc_labels_and_targets():
    O = D.VOCObject
    a = D.VOCAnnotation('x.jpg', 9, 9, (O('dog', (1, 1, 2, 2), difficult=True), O('cat', (1, 1, 2, 2)),
                                         O('cat', (1, 1, 2, 2), difficult=True), O('bus', (1, 1, 2, 2))))
    lab = voc_class_labels([a])[0]
    assert lab[VOC_CLASSES.index('dog')] == 0 and lab[VOC_CLASSES.index('cat')] == 1 and lab[VOC_CLASSES.index('bus')] == 1
    assert (lab == -1).sum() == 17
    t = voc_target(lab); assert t[VOC_CLASSES.index('dog')] == -1 and t[VOC_CLASSES.index('bird')] == 0
    assert voc_target(lab, 'positive')[VOC_CLASSES.index('dog')] == 1 and voc_target(lab, 'negative')[VOC_CLASSES.index('dog')] == 0


def test_tiny_imagenet_reader_bad_annotation(tmp_path):
    (tmp_path/'val'/'images').mkdir(parents=True); (tmp_path/'wnids.txt').write_text('n1\n')
    Image.new('RGB', (4, 4)).save(tmp_path/'val'/'images'/'val_0.JPEG')
    (tmp_path/'val'/'val_annotations.txt').write_text('val_0.JPEG\tn9\t0\t0\t1\t1\n')
    with pytest.raises(AnnotationError, match='line 1'): read_tiny_imagenet(tmp_path, 'val')
    with pytest.raises(AnnotationError, match='wnids.txt'): read_tiny_imagenet(tmp_path/'val', 'val')


# ---------------------------------------------------------------- datasets and loaders
def test_datasets_and_dataloaders(builtin):
    cfg = D.DATA_PRESETS['test']
    roots = D.dataset_roots(cfg, seed=0, builtin_dir=builtin)
    tr = read_class_folder(roots['imagenet'], 'train'); va = read_class_folder(roots['imagenet'], 'val', classes=tr.classes)
    dls = D.make_dataloaders(D.ImageClassification(tr, D.image_transforms(cfg.resize, cfg.crop, True)),
                             D.ImageClassification(va, D.image_transforms(cfg.resize, cfg.crop, False)), bs=8, num_workers=0, device='cpu')
    xb, yb = next(iter(dls.train))
    assert xb.shape == (8, 3, cfg.crop, cfg.crop) and yb.dtype == torch.int64
    assert [y for _, y in dls.valid.dataset][:2] == va.labels[:2].tolist()
    vs = read_voc(roots['voc07'], 'trainval')
    x, t = D.VOCClassification(vs, D.image_transforms(cfg.resize, cfg.crop, False))[0]
    assert t.tolist() == voc_target(vs.labels[0]).tolist()


def test_detection_flip_keeps_boxes_on_objects(builtin):
    vs = read_voc(builtin, 'trainval')
    torch.manual_seed(0)
    plain, flipped = D.VOCDetection(vs), D.VOCDetection(vs, train=True)
    for i in range(4):
        (x, t), (xf, tf) = plain[i], flipped[i]
        if torch.equal(x, xf): assert torch.equal(t['boxes'], tf['boxes']); continue
        W = x.shape[2]
        assert torch.allclose(tf['boxes'][:, [2, 0]], W - t['boxes'][:, [0, 2]])
        assert torch.equal(xf, x.flip(2))


def test_segmentation_dataset(builtin):
    seg = read_voc_segmentation(builtin, 'train')
    torch.manual_seed(0)
    for train in (True, False):
        x, y = D.VOCSegmentation(seg, crop=64, train=train)[0]
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(range(21)) | {255}


# ---------------------------------------------------------------- real samples
needs = lambda name: pytest.mark.skipif(not (SHARED/name).exists(), reason=f'real sample {SHARED/name} not present')


@needs('voc2007-mini')
def test_real_voc_reproduces_devkit_labels():
    root = SHARED/'voc2007-mini'
    for split in ('train', 'val', 'trainval', 'test'):
        vs = read_voc(root, split)
        ids, lab = read_voc_class_files(root, split)
        assert ids == vs.ids and lab.shape == (len(ids), 20)
        np.testing.assert_array_equal(vs.labels, lab)
    every = [read_voc(root, s) for s in ('trainval', 'test')]
    objs = [o for v in every for a in v.annotations for o in a.objects]
    assert sum(len(v) for v in every) == 100 and len(objs) == 273 and sum(o.difficult for o in objs) == 38
    assert {o.name for o in objs} == set(VOC_CLASSES)


@needs('tiny-imagenet-200-mini')
def test_real_tiny_imagenet_val_labels_from_annotation_file():
    root = SHARED/'tiny-imagenet-200-mini'
    v = read_tiny_imagenet(root, 'val')
    truth = dict(l.split('\t')[:2] for l in (root/'val'/'val_annotations.txt').read_text().splitlines() if l.strip())
    assert len(v) == len(truth) == 2000 and len(v.classes) == 200
    assert all(v.classes[it.label] == truth[it.path.name] for it in v.items)
    assert v.classes == tuple((root/'wnids.txt').read_text().split())
    tr = read_image_set(root, 'train'); assert len(tr) == 200*50 and tr.classes == v.classes


@needs('imagenette2-mini')
def test_real_grayscale_comes_back_rgb():
    gray = []
    for p in sorted((SHARED/'imagenette2-mini'/'train').rglob('*.JPEG')):
        with Image.open(p) as im:
            if im.mode == 'L': gray.append(p)
        if len(gray) >= 2: break
    assert gray, 'the sample is documented to contain grayscale images'
    for p in gray:
        a = np.asarray(load_rgb(p)); assert a.shape[2] == 3 and (a[..., 0] == a[..., 1]).all()


@needs('voc2007-mini')
def test_real_small_preset_roots():
    import dataclasses
    cfg = dataclasses.replace(D.DATA_PRESETS['small'], voc12='voc2007-mini')   # (its voc12 is built-in: not generated here)
    roots = D.dataset_roots(cfg, SHARED)
    assert roots['voc07'] == SHARED/'voc2007-mini'/'VOCdevkit'/'VOC2007' and roots['imagenet'].name == 'imagenette2-mini'

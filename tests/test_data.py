"""Tests of kt_paper.data: image decoding, readers (incl. bad input), data roles, the data stage, real samples."""
import dataclasses, os, shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_paper import data as D
from kt_paper.data import (VOC_CLASSES, AnnotationError, DataError, ImageReadError, load_rgb, read_class_folder,
                           read_unlabeled, read_tiny_imagenet, read_image_set, parse_voc_xml, read_voc, read_voc_class_files,
                           read_voc_segmentation, voc_class_labels, verify_images)
from kt_paper.samples import run_data
from kt_paper.synthetic import SCENE_CLASSES
from kt_paper.builtin import BUILTIN_SCALES, ensure_builtin_dataset

SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', Path(__file__).resolve().parents[1].parent/'shared'/'data'))


@pytest.fixture(scope='module')
def builtin(tmp_path_factory):
    "The test-scale built-in dataset (kt_paper.synthetic), generated once for this module."
    return ensure_builtin_dataset(tmp_path_factory.mktemp('b')/'builtin', seed=0, scale='test', n_workers=0)


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


# ---------------------------------------------------------------- readers on bad input
def test_class_folder_errors(builtin, tmp_path):
    t = tmp_path/'t'; shutil.copytree(builtin/'scenes'/'train', t/'train')
    s = read_class_folder(t, 'train'); assert s.classes == SCENE_CLASSES and len(s) == 10*4
    for p in (t/'train'/'lake').iterdir(): p.unlink()
    with pytest.raises(DataError, match=r'lake: class folder contains no images'): read_class_folder(t, 'train')
    with pytest.warns(UserWarning, match='skipped 1 of'): s = read_class_folder(t, 'train', on_error='skip')
    assert len(s) == 36 and 'lake' in s.skipped[0] and s.classes == SCENE_CLASSES
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


def test_voc_class_labels():
    O = D.VOCObject
    a = D.VOCAnnotation('x.jpg', 9, 9, (O('dog', (1, 1, 2, 2), difficult=True), O('cat', (1, 1, 2, 2)),
                                         O('cat', (1, 1, 2, 2), difficult=True), O('bus', (1, 1, 2, 2))))
    lab = voc_class_labels([a])[0]
    assert lab[VOC_CLASSES.index('dog')] == 0 and lab[VOC_CLASSES.index('cat')] == 1 and lab[VOC_CLASSES.index('bus')] == 1
    assert (lab == -1).sum() == 17
    assert voc_class_labels([]).shape == (0, 20)


def test_tiny_imagenet_reader_bad_annotation(tmp_path):
    (tmp_path/'val'/'images').mkdir(parents=True); (tmp_path/'wnids.txt').write_text('n1\n')
    Image.new('RGB', (4, 4)).save(tmp_path/'val'/'images'/'val_0.JPEG')
    (tmp_path/'val'/'val_annotations.txt').write_text('val_0.JPEG\tn9\t0\t0\t1\t1\n')
    with pytest.raises(AnnotationError, match='line 1'): read_tiny_imagenet(tmp_path, 'val')
    with pytest.raises(AnnotationError, match='wnids.txt'): read_tiny_imagenet(tmp_path/'val', 'val')


# ---------------------------------------------------------------- data roles and the data stage
def test_dataset_roots_and_read_role(builtin, monkeypatch):
    roots = D.dataset_roots(D.DATA_PRESETS['test'], seed=0, builtin_dir=builtin)
    assert roots == {r: builtin/sub for r, sub in [('imagenet', 'objects'), ('places', 'scenes'),
                                                   ('voc07', 'VOCdevkit/VOC2007'), ('voc12', 'VOCdevkit/VOC2012')]}
    assert isinstance(D.read_role('voc07', roots['voc07'], 'test'), D.VOCSet)
    assert isinstance(D.read_role('voc12', roots['voc12'], 'val'), D.SegSet)
    with pytest.raises(ValueError, match='unknown data role'): D.read_role('coco', roots['voc07'], 'train')
    monkeypatch.delenv('KT_PAPER_DATA', raising=False)
    with pytest.raises(DataError, match=r'pass data_root \(DATA_ROOT\)'): D.dataset_roots(D.DATA_PRESETS['paper'])
    roots = D.dataset_roots(D.DATA_PRESETS['paper'], '/nonexistent', check=False)
    assert roots['voc12'] == Path('/nonexistent/VOCdevkit/VOC2012')


def test_run_data_reads_every_split_and_writes_the_sheets(builtin, tmp_path):
    s = BUILTIN_SCALES['test']
    res = run_data(tmp_path/'run', 'test', seed=0, builtin_dir=builtin)
    assert res['images'] == dict(imagenet=dict(train=20*s['n_objects_train'], val=20*s['n_objects_val']),
                                 places=dict(train=len(SCENE_CLASSES)*s['n_scenes_train'], val=len(SCENE_CLASSES)*s['n_scenes_val']),
                                 voc07=dict(trainval=s['n_voc07_trainval'], test=s['n_voc07_test']),
                                 voc12=dict(train=s['n_voc12_train'], val=s['n_voc12_val']))
    assert res['sheets'] == [str(tmp_path/'run'/'figures'/f'data_samples_{r}.png') for r in D.ROLES]
    assert all(Image.open(p).size[0] > 200 for p in res['sheets'])
    assert res['builtin'] == list(D.ROLES) and res['roots']['voc07'] == str(builtin/'VOCdevkit'/'VOC2007')
    other = run_data(tmp_path/'run2', 'test', builtin_dir=builtin, fig_dir=tmp_path/'figs')
    assert [Path(p).parent for p in other['sheets']] == [tmp_path/'figs']*4


def test_run_data_fails_early_naming_the_file(builtin, tmp_path):
    with pytest.raises(DataError, match="ILSVRC2012: folder for role 'imagenet' not found"): run_data(tmp_path, 'paper', tmp_path)
    with pytest.raises(TypeError, match='no field'): run_data(tmp_path, 'test', builtin_dir=builtin, colour=1)
    real = tmp_path/'data'; shutil.copytree(builtin/'VOCdevkit'/'VOC2007', real/'VOC2007')
    for sub in ('objects', 'scenes'): (real/sub).symlink_to(builtin/sub)
    (real/'VOC2007'/'ImageSets'/'Main'/'test.txt').unlink()
    with pytest.raises(AnnotationError, match=r'test\.txt: split file not found'):
        run_data(tmp_path/'run', 'test', real, builtin_dir=builtin, imagenet='objects', places='scenes', voc07='VOC2007')
    assert not (tmp_path/'run'/'figures').exists()       # nothing written before every split has been read


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
    cfg = dataclasses.replace(D.DATA_PRESETS['small'], voc12='voc2007-mini')   # (its voc12 is built-in: not generated here)
    roots = D.dataset_roots(cfg, SHARED)
    assert roots['voc07'] == SHARED/'voc2007-mini'/'VOCdevkit'/'VOC2007' and roots['imagenet'].name == 'imagenette2-mini'

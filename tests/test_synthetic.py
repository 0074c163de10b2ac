"""Tests of kt_paper.synthetic: the generated stand-in dataset is deterministic, safe to create in parallel, and reads
back with kt_paper.data's readers as a consistent ImageNet / Places / VOC07 / VOC12 set."""
import hashlib, multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_paper import synthetic as S
from kt_paper.core import load_json, save_json
from kt_paper.data import (VOC_CLASSES, DataError, VOCAnnotation, VOCObject, load_mask, parse_voc_xml, read_voc,
                           read_voc_class_files, read_voc_segmentation)
from kt_paper import builtin as B
from kt_paper.synthetic import SCENE_CLASSES
from kt_paper.builtin import BUILTIN_SCALES, BUILTIN_VERSION, ensure_builtin_dataset, make_builtin_dataset

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


def test_generator_is_deterministic_and_worker_independent(tmp_path):
    a = make_builtin_dataset(tmp_path/'a', seed=1, **TINY, n_workers=0)
    b = make_builtin_dataset(tmp_path/'b', seed=1, **TINY, n_workers=2)
    assert _digest(a) == _digest(b)
    r = lambda s: np.asarray(S.render_voc_image(np.random.default_rng([s, 4, 0]))[0])
    assert np.array_equal(r(1), r(1)) and not (r(1).shape == r(2).shape and np.array_equal(r(1), r(2)))


def test_generator_refuses_nonempty(tmp_path):
    (tmp_path/'x').mkdir(); (tmp_path/'x'/'f').write_text('1')
    with pytest.raises(DataError, match='not empty'): make_builtin_dataset(tmp_path/'x', **TINY)


def _ensure(root): return str(ensure_builtin_dataset(root, seed=0, scale='test', n_workers=0))


def test_ensure_is_safe_in_parallel(tmp_path, monkeypatch):
    monkeypatch.setitem(BUILTIN_SCALES, 'test', dict(size=96, **TINY))    # smaller; the forked workers inherit it
    root = tmp_path/'shared'
    with mp.get_context('fork').Pool(2) as pool: res = pool.map(_ensure, [root, root])
    assert res == [str(root)]*2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith('.lock')) == ['shared']   # no temp dirs left
    assert load_json(root/'builtin.json')['version'] == BUILTIN_VERSION


def test_ensure_refuses_other_settings_and_versions(builtin, tmp_path):
    with pytest.raises(DataError, match='other settings'): ensure_builtin_dataset(builtin, seed=1, scale='test')
    with pytest.raises(ValueError, match='unknown scale'): ensure_builtin_dataset(builtin, scale='huge')
    old = tmp_path/'old'; old.mkdir(); save_json(dict(version=0, args={}), old/'builtin.json')
    with pytest.raises(DataError, match='generator version 0'): ensure_builtin_dataset(old, scale='test')


def test_builtin_layout(builtin):
    counts = load_json(builtin/'builtin.json')['counts']
    s = BUILTIN_SCALES['test']
    assert counts['objects'] == 20*(s['n_objects_train'] + s['n_objects_val'])
    assert counts['scenes'] == len(SCENE_CLASSES)*(s['n_scenes_train'] + s['n_scenes_val'])
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


def test_voc_xml_reads_back(tmp_path):
    ann = VOCAnnotation('000007.jpg', 120, 90, (VOCObject('cat', (1, 2, 30, 40), truncated=True, pose='Left'),
                                                VOCObject('bottle', (50, 5, 60, 80), difficult=True)), segmented=True)
    (tmp_path/'a.xml').write_text(B.voc_xml(ann, 'VOC2012'))
    assert parse_voc_xml(tmp_path/'a.xml') == ann


def test_default_root_is_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('KT_PAPER_CACHE', str(tmp_path/'cache'))
    monkeypatch.setitem(BUILTIN_SCALES, 'test', dict(size=96, **TINY))
    root = ensure_builtin_dataset(seed=2, scale='test', n_workers=0)
    assert root == B.builtin_root(2, 'test') and root.parent == tmp_path/'cache'
    assert load_json(root/'builtin.json')['args']['seed'] == 2

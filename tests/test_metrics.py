"Tests of kt_paper.metrics: VOC classification/detection AP and segmentation mean IoU against hand-computed values."
import os, xml.etree.ElementTree as ET
from pathlib import Path
import numpy as np
import pytest
from kt_paper.metrics import (voc_ap, pr_curve, classification_ap, classification_map, box_iou_voc, match_detections,
                              detection_ap, detection_map, confusion_matrix, iou_per_class, mean_iou)

SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', Path(__file__).resolve().parents[1].parent/'shared'/'data'))
VOC07 = SHARED/'voc2007-mini'/'VOCdevkit'/'VOC2007'


def devkit_ap_loop(scores, labels, use_07):
    "A literal transcription of VOCevalcls + VOCap (distinct scores only), as an independent reference."
    o = np.argsort(-np.asarray(scores)); gt = np.asarray(labels)[o]
    tp, fp = np.cumsum(gt > 0), np.cumsum(gt < 0)
    rec, prec = tp / (gt > 0).sum(), tp / np.maximum(fp + tp, 1e-300)
    if use_07:
        ap = 0.
        for t in [k / 10 for k in range(11)]:
            p = prec[rec >= t]; ap += (p.max() if len(p) else 0) / 11
        return ap
    mrec, mpre = [0, *rec, 1], [0, *prec, 0]
    for i in range(len(mpre) - 2, -1, -1): mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


@pytest.mark.parametrize('use_07', [True, False])
def test_ap_matches_devkit_transcription_on_random_cases(use_07):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40)); s = rng.permutation(n) / n
        y = rng.choice([-1, 0, 1], size=n, p=[.6, .1, .3])
        if not (y > 0).any(): y[0] = 1
        # the transcription scores 0-labels as neither tp nor fp too, but keeps them in the ranking (same curve points
        # repeated), which does not change either AP
        assert classification_ap(s, y, use_07) == pytest.approx(devkit_ap_loop(s, y, use_07), abs=1e-12)


def test_ap_hand_cases():
    assert voc_ap([.5, 1.], [1., 2/3], use_07_metric=False) == pytest.approx(5/6)
    assert voc_ap([.5, 1.], [1., 2/3]) == pytest.approx(28/33)
    # one positive ranked last of 4: precision 1/4 at recall 1
    assert classification_ap([.9, .8, .7, .1], [-1, -1, -1, 1], use_07_metric=False) == pytest.approx(.25)
    assert classification_ap([.9, .8, .7, .1], [-1, -1, -1, 1]) == pytest.approx(.25)
    # recall 1/3 at precision 1, nothing more found: all-point 1/3, 11-point 4/11 (thresholds 0, .1, .2, .3)
    assert classification_ap([.9, .1, .2], [1, 1, 1], use_07_metric=False) == pytest.approx(1.)
    rec, prec = np.array([1/3]), np.array([1.])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(1/3)
    assert voc_ap(rec, prec) == pytest.approx(4/11)


def test_11_point_thresholds_are_exact_tenths():
    # recall reaches exactly 3/10 at precision 1, then nothing else is found: thresholds 0, .1, .2 and .3 count
    assert voc_ap([.3], [1.]) == pytest.approx(4/11)
    assert voc_ap([.7], [1.]) == pytest.approx(8/11)


def test_ap_ties_are_order_independent():
    s, y = np.array([.5, .5, .5, .2, .2]), np.array([1, -1, -1, 1, -1])
    ref = classification_ap(s, y, False)
    # one point after the 3 tied (rec 1/2, prec 1/3), one after the 2 tied (rec 1, prec 2/5): area = 1/2*2/5 + 1/2*2/5
    assert ref == pytest.approx(2/5)
    for p in np.random.default_rng(1).permutation(np.tile(np.arange(5), (10, 1)), axis=1):
        assert classification_ap(s[p], y[p], False) == pytest.approx(ref)
    rec, prec = pr_curve(s, y > 0)
    np.testing.assert_allclose(rec, [.5, 1.]); np.testing.assert_allclose(prec, [1/3, 2/5])


def test_ap_undefined_and_bad_input():
    assert np.isnan(classification_ap([.1, .2], [0, 0]))            # all difficult
    assert np.isnan(classification_ap([.1, .2], [-1, -1]))          # no positives
    with pytest.raises(ValueError, match='labels must be'): classification_ap([.1], [2])
    with pytest.raises(ValueError, match='scores for'): classification_ap([.1, .2], [1])
    r = classification_map(np.eye(3), np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 0]]), list('abc'))
    assert r['ap']['a'] == r['ap']['b'] == 1 and np.isnan(r['ap']['c'])
    assert (r['map'], r['n_defined'], r['undefined']) == (1., 2, ['c'])
    with pytest.raises(ValueError, match='same'): classification_map(np.eye(3), np.eye(2))


def test_box_iou_voc_plus_one_convention():
    # 10x10 boxes (inclusive pixels 1..10) overlapping in 5 columns: 50 / 150
    assert box_iou_voc([1, 1, 10, 10], [[6, 1, 15, 10]])[0] == pytest.approx(1/3)
    assert box_iou_voc([1, 1, 1, 1], [[1, 1, 1, 1]])[0] == pytest.approx(1.)   # a one-pixel box has area 1
    assert box_iou_voc([1, 1, 10, 10], [[11, 1, 20, 10]])[0] == 0


def test_detection_duplicates_and_difficult():
    gt = {'x': (np.array([[1, 1, 100, 100]]), np.array([False]))}
    # three detections on one object: the best is a tp, the next two are duplicates
    tp, fp, npos = match_detections(['x'] * 3, [.7, .9, .8], [[1, 1, 100, 100]] * 3, gt)
    assert (tp.tolist(), fp.tolist(), npos) == ([1, 0, 0], [0, 1, 1], 1)
    assert detection_ap(['x'] * 3, [.7, .9, .8], [[1, 1, 100, 100]] * 3, gt, use_07_metric=False) == 1.
    # a detection below IoU .5 is a false positive; an image without that class's boxes too
    tp, fp, _ = match_detections(['x', 'y'], [.9, .8], [[60, 60, 160, 160], [1, 1, 5, 5]], gt)
    assert (tp.tolist(), fp.tolist()) == ([0, 0], [1, 1])
    # a difficult object: detections on it are ignored (no fp), and it does not count in recall
    gtd = {'x': (np.array([[1, 1, 100, 100], [200, 200, 300, 300]]), np.array([False, True]))}
    tp, fp, npos = match_detections(['x', 'x', 'x'], [.9, .8, .7], [[200, 200, 300, 300], [201, 201, 300, 300], [1, 1, 100, 100]], gtd)
    assert (tp.tolist(), fp.tolist(), npos) == ([0, 0, 1], [0, 0, 0], 1)
    assert detection_ap(['x'] * 3, [.9, .8, .7], [[200, 200, 300, 300], [201, 201, 300, 300], [1, 1, 100, 100]], gtd) == 1.
    # all difficult: undefined
    assert np.isnan(detection_ap(['x'], [.9], [[1, 1, 9, 9]], {'x': (np.array([[1, 1, 9, 9]]), np.array([True]))}))


def test_detection_matches_highest_iou_box_only():
    # the devkit matches each detection to its highest-IoU box; if that one is taken it is a duplicate (fp),
    # even when another box would have matched
    gt = {'x': (np.array([[1, 1, 100, 100], [11, 1, 110, 100]]), np.array([False, False]))}
    tp, fp, npos = match_detections(['x', 'x'], [.9, .8], [[1, 1, 100, 100], [2, 1, 101, 100]], gt)
    assert (tp.tolist(), fp.tolist(), npos) == ([1, 0], [0, 1], 2)
    assert detection_ap(['x', 'x'], [.9, .8], [[1, 1, 100, 100], [2, 1, 101, 100]], gt, use_07_metric=False) == pytest.approx(.5)


def test_detection_map_per_class():
    gt = {'a': dict(boxes=[[1, 1, 10, 10], [20, 20, 40, 40]], labels=[0, 1], difficult=[False, False]),
          'b': dict(boxes=[[5, 5, 30, 30]], labels=[1], difficult=[False])}
    dets = [('a', 0, .9, [1, 1, 10, 10]), ('a', 1, .3, [20, 20, 40, 40]), ('b', 1, .8, [50, 50, 60, 60])]
    r = detection_map(dets, gt, ['p', 'q', 'r'], use_07_metric=False)
    assert r['ap']['p'] == 1.
    # class q: fp (.8) then tp (.3) of 2 positives -> points (0, 0), (1/2, 1/2): area 1/2 * 1/2
    assert r['ap']['q'] == pytest.approx(.25)
    assert np.isnan(r['ap']['r']) and r['n_defined'] == 2 and r['map'] == pytest.approx(.625)


def test_mean_iou_hand_made_masks():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 2, 2]])
    cm = confusion_matrix(pred, gt, 3)
    assert cm.sum() == 10                                    # the two 255 pixels are ignored
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 3, 1], [0, 0, 2]])
    np.testing.assert_allclose(iou_per_class(cm), [3/4, 3/5, 2/3])
    assert mean_iou(cm) == pytest.approx((3/4 + 3/5 + 2/3) / 3)
    # a class in the prediction only has IoU 0; a class nowhere is undefined and left out
    cm5 = confusion_matrix(np.array([3, 0]), np.array([0, 0]), 5)
    iou = iou_per_class(cm5)
    assert iou[0] == pytest.approx(.5) and iou[3] == 0 and np.isnan(iou[1]) and np.isnan(iou[4])
    assert mean_iou(cm5) == pytest.approx(.25)
    assert np.isnan(mean_iou(np.zeros((3, 3))))
    with pytest.raises(ValueError, match='pixels'): confusion_matrix(np.zeros(3), np.zeros(4), 3)


def _voc_objects(xml):
    r = ET.parse(xml).getroot()
    return [(o.findtext('name'), int(o.findtext('difficult') or 0),
             [float(o.find('bndbox').findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]) for o in r.iter('object')]


@pytest.mark.skipif(not VOC07.exists(), reason=f'real VOC sample not found at {VOC07}')
def test_metrics_on_real_voc2007_annotations():
    "Perfect predictions score 1 on every defined class of the real sample; the devkit labels agree with the XML."
    cls = 'aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person pottedplant sheep sofa train tvmonitor'.split()
    ids = (VOC07/'ImageSets'/'Main'/'test.txt').read_text().split()
    lab = np.zeros((len(ids), 20), int)
    for j, c in enumerate(cls):
        d = dict(l.split() for l in (VOC07/'ImageSets'/'Main'/f'{c}_test.txt').read_text().splitlines() if l.strip())
        lab[:, j] = [int(d[i]) for i in ids]
    objs = {i: _voc_objects(VOC07/'Annotations'/f'{i}.xml') for i in ids}
    for i, row in zip(ids, lab):     # 1 = a non-difficult instance; 0 = only difficult ones; -1 = none
        for j, c in enumerate(cls):
            o = [d for n, d, _ in objs[i] if n == c]
            assert row[j] == (1 if 0 in o else 0 if o else -1), (i, c)
    r = classification_map(lab.astype(float), lab, cls)
    assert r['map'] == 1. and sorted(r['undefined']) == ['cat', 'diningtable', 'pottedplant', 'tvmonitor']
    gt = {i: dict(boxes=[b for _, _, b in o], labels=[cls.index(n) for n, _, _ in o], difficult=[bool(d) for _, d, _ in o])
          for i, o in objs.items()}
    dets = [(i, cls.index(n), 1., b) for i, o in objs.items() for n, d, b in o if not d]
    rd = detection_map(dets, gt, cls)
    assert rd['map'] == 1. and rd['n_defined'] == 16
    # dropping half of the detections of each class halves nothing exact, but must lower every AP with >1 box
    rd2 = detection_map(dets[::2], gt, cls, use_07_metric=False)
    assert rd2['map'] < 1.

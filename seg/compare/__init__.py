"""Compare losses over seeds: a Hydra sweep of ``tools/train.py``, then a report.

Published gains of OHEM on Cityscapes are a few tenths of a point while run-to-run spread
is one to two points, so one run per loss proves nothing. A comparison trains each loss
with several seeds (same data, schedule and budget; only ``loss`` and ``seed`` change),
then reports mean +- std per loss, each run's value, per-class IoU, rare-class mIoU,
training time per iteration and val-mIoU curves, and each difference between two losses
with a 95% confidence interval from a paired bootstrap over val images and seeds; a loss
is called ahead only when that interval excludes 0.

- :mod:`seg.compare.sweep`: ``tools/compare.py``, which runs
  ``tools/train.py -m ... seed=... loss=...`` on any Hydra launcher, then reports;
- :mod:`seg.compare.runs`: the runs of a sweep folder, refused unless they are one
  finished budget;
- :mod:`seg.compare.stats`: mean +- std, rare classes;
- :mod:`seg.compare.per_image`: each run's val confusion matrices image by image (for
  the bootstrap of :mod:`seg.bootstrap`);
- :mod:`seg.compare.report`: ``report.md``, ``report.json`` and the plots.

Layout of a comparison folder (a sweep folder)::

    <loss>-seed<seed>/             one training run each (.hydra/, train.log, TensorBoard
                                   events, checkpoints/, per_image_confusion.npz)
    multirun.yaml                  Hydra's record of the sweep
    report.md, report.json         the report
    miou_curves.png, class_iou.png the plots

``tensorboard --logdir <folder>`` shows every run side by side.
"""

"""The pretraining engine.

``engine.pretrain(config, out_dir)`` runs one job and ``engine.Trainer`` is its single step;
``resume`` (what a checkpoint holds and when a run may resume from it), ``rundir`` (run.json,
metrics.json, curve.csv), ``schedule`` (warm-up and step decays), ``checkpoint`` (atomic,
hash-verified), ``determinism``
(seeds and RNG states), ``distributed`` and ``sync_bn`` (DDP), ``meters`` and ``progress`` are its
parts, and ``command`` is ``ssltk pretrain``. Import from those modules; this package stays light
so the CLI starts fast.
"""

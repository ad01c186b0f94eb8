"""Evaluation of synthetic data by what it does for a segmenter (SPEC §6).

- :mod:`~diffaug.evaluation.scoring`: HoVer-Net's metrics over lists of label maps;
- :mod:`~diffaug.evaluation.split`: split tile folders by source image;
- :mod:`~diffaug.evaluation.fidelity`: label fidelity (a real-trained segmenter on synthetic images);
- :mod:`~diffaug.evaluation.downstream`: downstream gain (segmenters trained with and without synthetic pairs);
- :mod:`~diffaug.evaluation.fid`: optional FID/KID with user-supplied Inception weights.

Submodules are imported on use (``from diffaug.evaluation.downstream import run_downstream``).
"""

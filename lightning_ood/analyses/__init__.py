"""Paper-specific analyses, one module per method, called by the evaluation session when
their detectors are present: :mod:`~lightning_ood.analyses.line` (LINe Figure 1, Table 8) and
:mod:`~lightning_ood.analyses.fssd` (FSSD per-layer histograms, severity Figures 4-5)."""

"""Linear evaluation of frozen representations, as in arXiv 1901.09005.

``lbfgs`` is the paper's main protocol: multinomial logistic regression with L2, trained by
L-BFGS on precomputed features, its strength chosen on a held-out split.
"""

"""Shipped ranking models (written by bench/fit_ranking.py; do not edit by hand).

``DEFAULTS`` maps a model's ``remote_model`` to the ranking model fitted for it
on the fitting halves of the labelled sets; ``GENERIC`` serves every other
model until an administrator fits one (omop-emb-pg fit-ranking).
"""

GENERIC = {
    "features": ["similarity_gap", "trigram", "word_dice", "initialism", "abbreviation_in_text",
                 "exact"],
    "coef": [40.0, 2.0, 1.0, 3.0, 2.0, 3.0],
    "intercept": 0.0,
    "calibration": {"score": 1.0, "margin": 0.5, "intercept": -1.0},
    "fitted_on": "hand-set placeholder",
}

DEFAULTS = {}

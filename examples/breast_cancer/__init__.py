"""breast_cancer: three hospitals train one diagnosis model without pooling records.

A federation project (see hfl's README, "Your own model and data"): model.py
builds a small MLP, data.py reads one hospital's table, plan.toml names both.
make_hospitals.py writes the example's hospital tables from scikit-learn's
bundled Wisconsin breast-cancer data (nothing is downloaded).
"""

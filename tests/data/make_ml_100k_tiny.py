"""Writes tests/data/ml-100k-tiny: the first 300 ml-100k users, each with their first 30 ratings in time order,
and the items they rated (title, year, genres), from the copy inside the recbole wheel. Run once; output committed."""

import os
from importlib.util import find_spec

import pandas as pd

N_USERS, PER_USER = 300, 30
source = os.path.join(find_spec("recbole").submodule_search_locations[0], "dataset_example", "ml-100k")
target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ml-100k-tiny")
os.makedirs(target, exist_ok=True)

inter = pd.read_csv(os.path.join(source, "ml-100k.inter"), sep="\t", dtype=str)
inter = inter[inter["user_id:token"].astype(int) <= N_USERS]
inter = inter.sort_values(["user_id:token", "timestamp:float"], key=lambda c: c.astype(float), kind="stable")
inter = inter.groupby("user_id:token", sort=False).head(PER_USER)
inter.to_csv(os.path.join(target, "ml-100k-tiny.inter"), sep="\t", index=False)

items = pd.read_csv(os.path.join(source, "ml-100k.item"), sep="\t", dtype=str, keep_default_na=False)
items = items[items["item_id:token"].isin(set(inter["item_id:token"]))]
items.to_csv(os.path.join(target, "ml-100k-tiny.item"), sep="\t", index=False)
print(f"{inter['user_id:token'].nunique()} users, {len(items)} items, {len(inter)} interactions -> {target}")

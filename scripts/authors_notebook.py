"""The ReDSM5 authors' baseline notebook (examples/bert.ipynb in github.com/eliseobao/redsm5), its code run as it
is on one of our folds: the check that configs/redsm5_authors.yaml is their recipe (issue 28).

    python scripts/authors_notebook.py --data_dir corpora/written --splits OUT/splits/fold0.json \
        --model minilm --out results/authors_notebook_fold0.json

Their cells, in order, unchanged but for what the measurement needs (each marked "# changed:"):
- the data: our csv folder's posts, each post's labels the symptoms with a status-1 row, else NO_SYMPTOMS (their
  data/redsm5.csv is not public; this is how its `labels` column reads), and our fold's train and test posts in
  place of their random 80/20 split (the fold's validation posts are not used: they train on the train posts only,
  as the preset does);
- the encoder: a local folder (MiniLM offline) in place of 'bert-base-uncased';
- torch.manual_seed(seed) before the model is built (they set none);
- the report: micro and macro F1 of classification_report also written to --out as JSON.
Nothing of ours is imported but packaged_encoders.SHORT_NAMES (where the MiniLM package keeps its folder).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from sklearn.metrics import accuracy_score, classification_report  # noqa: E402
from sklearn.preprocessing import MultiLabelBinarizer  # noqa: E402
from torch.optim import AdamW  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import BertForSequenceClassification, BertTokenizer  # noqa: E402


def model_folder(name):
    import importlib

    import packaged_encoders

    if name in packaged_encoders.SHORT_NAMES:
        package, sub, _ = packaged_encoders.SHORT_NAMES[name]
        return os.path.join(os.path.dirname(importlib.import_module(package).__file__), sub)
    return name


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data_dir", required=True)
parser.add_argument("--splits", required=True, help="a fold's splits.json (train / val / test post ids)")
parser.add_argument("--model", default="minilm")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--out", required=True)
args = parser.parse_args()

# changed: their data/redsm5.csv (text, labels "A;B") built from our csv folder
posts = pd.read_csv(os.path.join(args.data_dir, "posts.csv"), dtype=str, keep_default_na=False)
ann = pd.read_csv(os.path.join(args.data_dir, "annotations.csv"), dtype=str, keep_default_na=False)
positive = ann[ann["status"].str.strip() == "1"].groupby("post_id")["DSM5_symptom"].agg(lambda s: sorted(set(s)))
data = pd.DataFrame({"post_id": posts["post_id"], "text": posts["text"]})
data["labels"] = [";".join(positive.get(pid, ["NO_SYMPTOMS"])) for pid in data["post_id"]]

# Load dataset
data['labels'] = data['labels'].apply(lambda x: x.split(';'))  # Convert labels to list

# MultiLabel Binarization
mlb = MultiLabelBinarizer()
labels = mlb.fit_transform(data['labels'])
texts = data['text'].tolist()

# changed: our fold in place of train_test_split(texts, labels, test_size=0.2, random_state=42)
splits = json.load(open(args.splits))
row = {pid: i for i, pid in enumerate(data["post_id"])}
X_train = [texts[row[p]] for p in splits["train"]]
y_train = [labels[row[p]] for p in splits["train"]]
X_test = [texts[row[p]] for p in splits["test"]]
y_test = [labels[row[p]] for p in splits["test"]]

print(f'{texts[0][0:15]}... ---> {labels[0]}')

path = model_folder(args.model)  # changed: 'bert-base-uncased'
tokenizer = BertTokenizer.from_pretrained(path)

def tokenize_texts(texts, tokenizer, max_len=512):
    return tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors='pt')

class TextDataset(Dataset):
    def __init__(self, texts, labels, tokenizer):
        self.texts = tokenize_texts(texts, tokenizer)
        self.labels = torch.tensor(labels, dtype=torch.float)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return {key: val[idx] for key, val in self.texts.items()}, self.labels[idx]

torch.manual_seed(args.seed)  # changed: they set no seed
train_dataset = TextDataset(X_train, y_train, tokenizer)
test_dataset = TextDataset(X_test, y_test, tokenizer)

train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True)
test_loader = DataLoader(test_dataset, batch_size=8, shuffle=False)

model = BertForSequenceClassification.from_pretrained(
    path,  # changed: 'bert-base-uncased'
    num_labels=len(mlb.classes_),
    problem_type='multi_label_classification'
)
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
model.to(device)

criterion = nn.BCEWithLogitsLoss()
optimizer = AdamW(model.parameters(), lr=2e-5)

start = time.perf_counter()
model.train()
for epoch in range(5):
    loop = tqdm(train_loader, leave=True)
    for batch in loop:
        inputs, targets = batch
        inputs = {key: val.to(device) for key, val in inputs.items()}
        targets = targets.to(device)

        optimizer.zero_grad()
        outputs = model(**inputs).logits
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()

        loop.set_description(f"Epoch {epoch+1}")
        loop.set_postfix(loss=loss.item())
train_seconds = time.perf_counter() - start

model.eval()
all_preds, all_targets = [], []
with torch.no_grad():
    for batch in test_loader:
        inputs, targets = batch
        inputs = {key: val.to(device) for key, val in inputs.items()}
        targets = targets.cpu().numpy()

        outputs = torch.sigmoid(model(**inputs).logits).cpu().numpy()
        preds = (outputs > 0.5).astype(int)

        all_preds.extend(preds)
        all_targets.extend(targets)

print(classification_report(all_targets, all_preds, target_names=mlb.classes_, zero_division=0))
print(f"Accuracy: {accuracy_score(all_targets, all_preds):.2f}")

# changed: the figures also to a file
report = classification_report(all_targets, all_preds, target_names=mlb.classes_, zero_division=0, output_dict=True)
with open(args.out, "w") as f:
    json.dump({"paper_micro_f1": report["micro avg"]["f1-score"], "paper_macro_f1": report["macro avg"]["f1-score"],
               "per_label_f1": {c: report[c]["f1-score"] for c in mlb.classes_},
               "accuracy": accuracy_score(all_targets, all_preds), "train_posts": len(X_train),
               "test_posts": len(X_test), "train_seconds": round(train_seconds, 1), "model": path,
               "seed": args.seed, "splits": args.splits}, f, indent=1)
print("wrote", args.out)

"""Evaluation: the official Qwen-VL metrics, prompts and data formats, and a sharded, resumable runner.

    qwenvl eval --task vqa --data vqa_en.jsonl --model DIR [--endpoint URL] [--batch-size 8] [--out DIR]

Metrics (one file per family; pure functions, each reproducing the official script, quirks included):
    caption.py          BLEU / METEOR / ROUGE-L / CIDEr via pycocoevalcap
    vqa_accuracy.py     VQAv2 / OK-VQA / TextVQA / VizWiz accuracy with the official normalisation
    anls.py             DocVQA ANLS
    chartqa.py          ChartQA relaxed accuracy (official and corrected argument order)
    exact_match.py      GQA (with its cleaning), OCR-VQA, AI2D
    refcoco.py          RefCOCO / + / g Precision@1 (IoU >= 0.5, /999 or /1000)
    multiple_choice.py  likelihood ranking; MMBench circular scorers
    mme.py              MME acc / acc+ / totals
    touchstone.py       the TouchStone judge protocol
Running:
    datasets.py         the official data files -> Samples (prompt, images, target)
    tasks.py            the task table: prompts, generation lengths, scoring, official result files
    local.py            a local Qwen-VL: batched greedy generation with left padding; option losses
    endpoint.py         any OpenAI-compatible /v1/chat/completions server
    runner.py           sharding over torchrun ranks, per-sample logs, resume, progress, summary
    cli.py              `qwenvl eval`
"""

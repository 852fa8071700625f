"""The eval stage: checkpoints (by default the final/ of every needed training stage) draw prompt sets through
the project's samplers with the same seeds, scorers (`simplear.scorers`) judge the images, and one report
(`<stage>/report.html`, `report.json`) puts the checkpoints side by side. Images are kept in the public
scorers' layouts (GenEval's folders, DPG-Bench's 2x2 grids), resumable per prompt, and a rerun takes back
the images of every checkpoint that did not change."""

"""What the one training loop (engine/train.py) trains: a task supplies the model, the loaders, the evaluation
and its outputs; the loop does everything else the same way for every task.

    base.py      the Task interface and what every task needs (opening a store named by a config key)
    pretrain.py  LXMERT's five pre-training tasks on text and region stores
    finetune.py  VQA / GQA (LxmertForQuestionAnswering) and NLVR2 (LxmertForNLVR2) on task stores
"""

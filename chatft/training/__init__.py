"""Training, one room per job, in the order a run goes through them:

    arguments.py     TrainArguments: the Trainer's arguments with chatft's defaults and additions
    command_line.py  the command line, --config run.yaml, the short --help, the stage asked for, the precision
    flow.py          the steps every stage takes in order (data sets, seeded model) and its exit statuses
    process.py       per-process setup: glibc memory behaviour, threads fitted to the load, who logs
    data.py          SFT's prepared data sets, whether training may start, the datasets the Trainer gets
    step_plan.py     examples or packed rows per step, micro-batches, checkpointing, DeepSpeed, evaluation
    time_budget.py   --time_budget: the step count from measured steps, the schedule laid over it
    trainer.py       ChatTrainer (chatft's loss, packed-row guard, step statistics), the step-grouped sampler
    samples.py       generation while training: sample answers, ROUGE/BLEU at evaluation
    checkpoints.py   run arguments beside every checkpoint, resume, the final save
    plot.py          the loss curve

and one thin module per stage that composes them: sft.py, preference.py (with preference_trainer.py, TRL's
trainers as chatft runs them). stages.py dispatches finetune.py's --stage. No room imports a stage.
"""

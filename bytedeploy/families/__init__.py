"""bytedeploy.families: what each model family is, without PyTorch.

One module per family (the registry's FACTS), imported by the family's model module in bytedeploy/models/ (the
training and eager side, torch) and by its bundle loop in runtimes/ (the deploy side, numpy + ONNX Runtime):

  Config, PRESETS     the model hyperparameters (a bundle's bundle.json "model_config" is a Config)
  UNIT, ...           constants both sides share (special symbols, default lengths, tokenizer file names)
  prompt planning     a GenerateRequest laid out the way every backend samples from it
  tokenizer loading   from a checkpoint's or a bundle's assets folder

Nothing here imports torch, and nothing here imports bytedeploy.models.
"""

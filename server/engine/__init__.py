"""The engine: the loop thread, the step (schedule -> run -> update), scheduler and block manager, model
runner, sampler, output processing (detokenization, stop strings, logprobs) and tensor-parallel workers."""

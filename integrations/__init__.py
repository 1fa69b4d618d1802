"""Model-server hooks: tell wattspan which requests were in each batch step.

* :mod:`wattspan.integrations.batch` - the generic batch-step API any server can call;
* :mod:`wattspan.integrations.vllm` - vLLM's engine steps;
* :mod:`wattspan.integrations.openai_proxy` - a metering proxy in front of any OpenAI-compatible server.
"""

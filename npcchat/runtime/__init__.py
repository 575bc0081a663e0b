"""The turn runtime: what one NPC turn runs on.

``bundle`` (the model directory and its checks) -> ``prompt`` (the bundle's template,
scaffold tags kept apart from text) -> ``engine`` (one prefill: `<STATE>` vector, heads,
generation) over ``backend`` (the only module importing ``llama_cpp``) and ``heads`` (the
only module importing ``onnxruntime``). ``model`` says what the engine needs of a model,
``vocab`` the token ids it checks once, ``prefill`` how a prompt is cut into decode calls,
``kvbook`` what each KV cache holds, ``batch`` how turns run side by side.

Imports only npcchat's foundation (``errors``, ``types``, ``config``, ``files``).
"""

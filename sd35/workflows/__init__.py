"""ComfyUI workflows run by sd35: API-format graphs (and a ComfyUI PNG's embedded ``prompt``) checked,
evaluated into one :class:`~sd35.request.GenerateRequest` per sampler node plus the files to load, and run.

- :mod:`sd35.workflows.nodes`: the nodes we run, with ComfyUI's inputs and outputs;
- :mod:`sd35.workflows.models`: model names resolved in a ComfyUI models folder, or found by content;
- :mod:`sd35.workflows.inputs`: image names resolved in ComfyUI's input folder, never outside it;
- :mod:`sd35.workflows.graph`: reading a workflow and checking it before anything runs (ComfyUI's
  ``node_errors``);
- :mod:`sd35.workflows.evaluate`: what each node means, as one request per sampler;
- :mod:`sd35.workflows.pixels`: ComfyUI's IMAGE and MASK tensors and what its image nodes do to them;
- :mod:`sd35.workflows.execute`: the descriptions made real, each sampler run once through the pipeline;
- :mod:`sd35.workflows.run`: loading, sampling and saving the images with the workflow embedded.

There is no second sampling path: a workflow's image is the one ``sd35 generate`` makes with the
equivalent ComfyUI-named options.
"""

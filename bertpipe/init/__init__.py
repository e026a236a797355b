"""The starting checkpoint of continued pretraining (`model.init`): fetched once by the init stage
(`fetch`), its folder's format (`folder`), and its weights in and out of bertpipe's model (`weights`)."""

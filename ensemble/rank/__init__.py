"""The ranking stage: a Generative Recommender (GR) that reads a member's history as a sequence of
(post, action) pairs and scores every retrieved candidate for several engagement tasks at once."""

"""The Kubernetes side of Strata: Kopf handlers -> StudyService -> builders and the API adapter."""

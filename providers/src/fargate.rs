//! The `fargate` provider: one ECS task on AWS Fargate per session (being written).
